"""``Predictor``: Detectron2's DefaultPredictor for any image a user may pass.

Differences from ``detectron2.engine.DefaultPredictor``:

* the weights are loaded with :class:`~gfocalv2.checkpoint.GFocalCheckpointer`
  (missing file, other architecture or other class count: a clear error);
* the input may be gray (H, W) or (H, W, 1), BGR/RGB (H, W, 3) or with alpha (H, W, 4)
  (alpha is dropped); an empty or otherwise shaped array is a ValueError naming the shape;
* the resize never produces a 0-pixel side (a 1 x 5000 image works), and images of any
  size are resized to the test size as usual, with ``INPUT.RESIZE_BACKEND`` (OpenCV bilinear
  as the reference in the published configs, or Detectron2's PIL bilinear), as the test loader;
* after loading, the model gets the exact inference rewrites of ``TEST.FOLD_BATCHNORM`` and
  ``TEST.MEMORY_FORMAT`` (``gfocalv2/modeling/inference_optimization.py``): BatchNorms are
  folded into their convolutions, so ``predictor.model`` no longer loads or saves
  checkpoints (``GFocalCheckpointer`` refuses, saying so; build a new ``Predictor`` for
  other weights);
* with ``TEST.AUG.ENABLED``, the detections are those of test-time augmentation
  (:class:`~gfocalv2.test_time_augmentation.GFocalV2WithTTA`: every view resized from the
  original image).
"""

import logging

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from ..checkpoint import checkpointer_for
from ..data.mapper import SafeResizeShortestEdge, to_three_channels
from ..data.transforms import resize_backend
from ..modeling.inference_optimization import optimize_for_inference
from ..test_time_augmentation import GFocalV2WithTTA

__all__ = ["Predictor"]

logger = logging.getLogger(__name__)


class Predictor(DefaultPredictor):
    """See the module docstring. ``predictor(image)`` takes an (H, W[, C]) uint8 array in
    ``cfg.INPUT.FORMAT``'s channel order and returns ``{"instances": Instances}`` in
    the image's coordinates."""

    def __init__(self, cfg):  # noqa: D107  (DefaultPredictor.__init__ not called: it loads without checks)
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        self.model.eval()
        if len(cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        checkpointer_for(cfg, self.model).load(cfg.MODEL.WEIGHTS)
        optimize_for_inference(self.model, cfg)
        self.aug = SafeResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST],
            cfg.INPUT.MAX_SIZE_TEST,
            backend=resize_backend(cfg),
        )
        self.tta = GFocalV2WithTTA(cfg, self.model) if cfg.TEST.AUG.ENABLED else None
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(
                f"INPUT.FORMAT must be 'RGB' or 'BGR' for the predictor, got {self.input_format!r}"
            )

    def __call__(self, original_image):
        original_image = to_three_channels(original_image, "the predictor's input image")
        with torch.no_grad():
            if self.input_format == "RGB":  # the input is BGR, like cv2.imread's
                original_image = original_image[:, :, ::-1]
            height, width = original_image.shape[:2]
            if self.tta is not None:  # the views are resized from the original image
                image = torch.as_tensor(np.ascontiguousarray(original_image.transpose(2, 0, 1)))
                return self.tta([{"image": image, "height": height, "width": width}])[0]
            image = self.aug.get_transform(original_image).apply_image(original_image)
            image = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
            return self.model([{"image": image, "height": height, "width": width}])[0]
