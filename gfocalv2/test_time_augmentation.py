"""Test-time augmentation for GFocalV2 / GFL, driven by Detectron2's ``TEST.AUG`` keys.

Detectron2's ``GeneralizedRCNNWithTTA`` serves R-CNN only; :class:`GFocalV2WithTTA` is its
counterpart for this dense detector. Each image is seen as several views: resized so that its
short side is each of ``TEST.AUG.MIN_SIZES`` (the long side at most ``TEST.AUG.MAX_SIZE``), each
also flipped left-right when ``TEST.AUG.FLIP``. Every view gives its candidates (the per-level
top-k locations, decoded and clipped: :func:`~gfocalv2.modeling.detections.image_candidates`);
they are mapped into the frame of the plain model's input (the image resized with
``INPUT.MIN_SIZE_TEST`` / ``INPUT.MAX_SIZE_TEST``), merged, and go through the model's own score
threshold, class-wise NMS and detection limit (:meth:`GFocalV2.detections`), then to the output
size as the plain model's detections (Detectron2's ``detector_postprocess``). This is
MMDetection's test-time augmentation of dense heads (candidates of all views, one NMS).

With one view equal to the plain model's input (``MIN_SIZES`` = (``MIN_SIZE_TEST``,),
``MAX_SIZE`` = ``MAX_SIZE_TEST``, no flip) the detections are the plain model's, exactly.

The views of an image whose padded sizes are equal (a view and its flip) run as one batch;
images are processed one at a time, so each image of a batch gets what it gets alone.
"""

import logging
from collections import defaultdict
from typing import Dict, List, Tuple

import numpy as np
import torch
from detectron2.modeling.postprocessing import detector_postprocess
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .data.mapper import SafeResizeShortestEdge
from .data.transforms import resize_backend
from .modeling.detections import clip_candidates

__all__ = ["GFocalV2WithTTA", "tta_settings", "original_size_inputs", "TTAView"]

logger = logging.getLogger(__name__)


def tta_settings(cfg) -> Tuple[Tuple[int, ...], int, bool]:
    """``(TEST.AUG.MIN_SIZES, TEST.AUG.MAX_SIZE, TEST.AUG.FLIP)`` of ``cfg``, checked: at least
    one size, every size a positive integer, ``MAX_SIZE`` not below any of them (a ValueError
    naming the key and the value otherwise)."""
    aug = cfg.TEST.AUG
    min_sizes = aug.MIN_SIZES
    if isinstance(min_sizes, int):
        min_sizes = (min_sizes,)
    min_sizes = tuple(min_sizes)
    if not min_sizes:
        raise ValueError(
            "TEST.AUG.MIN_SIZES is empty: test-time augmentation needs at least one size for the "
            'short side, e.g. TEST.AUG.MIN_SIZES "(800,)" (or set TEST.AUG.ENABLED False)'
        )
    bad = [s for s in min_sizes if not isinstance(s, int) or isinstance(s, bool) or s <= 0]
    if bad:
        raise ValueError(
            f"TEST.AUG.MIN_SIZES {min_sizes}: {bad} not a positive whole number of pixels (the "
            "short side of each view)"
        )
    max_size = aug.MAX_SIZE
    if not isinstance(max_size, int) or isinstance(max_size, bool) or max_size < max(min_sizes):
        raise ValueError(
            f"TEST.AUG.MAX_SIZE {max_size!r} is below TEST.AUG.MIN_SIZES {min_sizes}: it caps the "
            f"long side of every view, so it must be at least the largest short side "
            f"({max(min_sizes)})"
        )
    return min_sizes, max_size, bool(aug.FLIP)


def original_size_inputs(cfg):
    """A copy of ``cfg`` whose test loader gives the images at their own size
    (``INPUT.MIN_SIZE_TEST`` 0: Detectron2's "no resize at test time"), for
    :class:`GFocalV2WithTTA`, which resizes every view from the original image."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.INPUT.MIN_SIZE_TEST = 0
    cfg.freeze()
    return cfg


class TTAView:
    """One view of an image: resized to ``size`` (height, width), flipped left-right or not."""

    __slots__ = ("size", "flip", "image")

    def __init__(self, size: Tuple[int, int], flip: bool, image: Tensor):
        self.size, self.flip, self.image = size, flip, image

    def to_frame(self, boxes: Tensor, frame: Tuple[int, int]) -> Tensor:
        """(K, 4) boxes in this view's pixels -> in the pixels of the same image resized to
        ``frame`` (height, width)."""
        h, w = self.size
        if self.flip:  # as Detectron2's HFlipTransform.apply_box: x -> width - x
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        if (h, w) == tuple(frame):
            return boxes
        scale = boxes.new_tensor([frame[1] / w, frame[0] / h, frame[1] / w, frame[0] / h])
        return boxes * scale


class GFocalV2WithTTA(nn.Module):
    """A ``GFocalV2`` (or ``DistributedDataParallel`` of one) with test-time augmentation.

    Called as the model at test time: a list of dicts with ``"image"`` (C, H, W) in the model's
    input format, as read from the file (any size: every view is resized from it), and
    optionally ``"height"``, ``"width"`` (the size of the output; default the image's); returns
    ``[{"instances": Instances}]`` as the model does.

    Args:
        cfg: the config; ``TEST.AUG`` gives the views (:func:`tta_settings`), ``INPUT`` the
            plain model's test size and resize, the model its thresholds.
        model: the model, in eval mode.
    """

    def __init__(self, cfg, model: nn.Module):
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        if not hasattr(model, "candidates") or not hasattr(model, "detections"):
            raise TypeError(
                "GFocalV2WithTTA augments a GFocalV2 / GFL model (MODEL.META_ARCHITECTURE "
                f"GFocalV2), got {type(model).__name__}"
            )
        self.model = model
        self.min_sizes, self.max_size, self.flip = tta_settings(cfg)
        if self.flip and cfg.INPUT.RANDOM_FLIP != "horizontal":
            # Measured on DigitScenes (trained without flips, digits are not mirror-symmetric):
            # AP 80.1 plain, 71.6 with the flip.
            logger.warning(
                "TEST.AUG.FLIP is on but the model was trained with INPUT.RANDOM_FLIP %r: the "
                "mirrored views show it objects it never saw, which lowers AP when the classes "
                "are not mirror-symmetric (text, digits, signs); set TEST.AUG.FLIP False",
                cfg.INPUT.RANDOM_FLIP,
            )
        backend = resize_backend(cfg)
        self._base_resize = SafeResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST, backend=backend
        )
        self._view_resizes = [
            SafeResizeShortestEdge([s, s], self.max_size, backend=backend) for s in self.min_sizes
        ]

    def __repr__(self):
        return (
            f"GFocalV2WithTTA(min_sizes={self.min_sizes}, max_size={self.max_size}, "
            f"flip={self.flip})"
        )

    @torch.no_grad()
    def forward(self, batched_inputs: List[Dict]) -> List[Dict]:
        return [self._detect(inputs) for inputs in batched_inputs]

    # ------------------------------------------------------------------ helpers
    def views(self, image: Tensor) -> List[TTAView]:
        """The views of a (C, H, W) image: per size, resized (and flipped when ``flip``)."""
        array = image.permute(1, 2, 0).cpu().numpy()
        views = []
        for resize in self._view_resizes:
            resized = resize.get_transform(array).apply_image(array)
            tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
            size = tuple(tensor.shape[-2:])
            views.append(TTAView(size, False, tensor))
            if self.flip:
                views.append(TTAView(size, True, tensor.flip(-1)))
        return views

    def base_size(self, height: int, width: int) -> Tuple[int, int]:
        """The plain model's input size for an image of ``height`` x ``width``: the frame in
        which the views are merged."""
        tfm = self._base_resize.get_transform(np.empty((height, width, 0), dtype=np.uint8))
        return (tfm.new_h, tfm.new_w) if hasattr(tfm, "new_h") else (height, width)

    def _view_candidates(self, views: List[TTAView]) -> List[Tuple[Tensor, Tensor]]:
        """Each view's candidates in its own pixels; views of equal padded size in one batch."""
        model = self.model
        div = max(1, model.backbone.size_divisibility)
        groups = defaultdict(list)  # padded size -> indices of the views
        for i, view in enumerate(views):
            groups[tuple(-(-s // div) * div for s in view.size)].append(i)
        out = [None] * len(views)
        for indices in groups.values():
            images = model.preprocess_image([{"image": views[i].image} for i in indices])
            features = model.backbone(images.tensor)
            features = [features[f] for f in model.head_in_features]
            for i, candidates in zip(
                indices, model.candidates(images, features, model.head(features))
            ):
                out[i] = candidates
        return out

    def _detect(self, inputs: Dict) -> Dict:
        image = inputs["image"]
        height, width = image.shape[-2:]
        frame = self.base_size(height, width)
        views = self.views(image)
        boxes, scores = [], []
        for view, (view_boxes, view_scores) in zip(views, self._view_candidates(views)):
            b, s = clip_candidates(view.to_frame(view_boxes, frame), view_scores, *frame)
            boxes.append(b)
            scores.append(s)
        result = self.model.detections(torch.cat(boxes), torch.cat(scores), frame)
        # as DenseDetector.forward: to the requested output size
        out_h, out_w = inputs.get("height", height), inputs.get("width", width)
        return {"instances": detector_postprocess(result, out_h, out_w)}
