"""GFocalV2 / GFL inference as one graph that exports for any input size.

:class:`DeployableGFocalV2` computes what ``GFocalV2.forward_inference`` computes for one image,
with operations whose output sizes follow the input's (``torch.export`` with dynamic height
and width): normalization, zero padding to the backbone's size divisibility, backbone, head,
then the steps after the head that the model itself runs (:mod:`.detections`: anchor centres
from each level's size, per-level top-k, decoding, clipping, class-wise NMS as one operator,
``gfocalv2::class_wise_nms``); no Detectron2 structure (``Boxes``, ``Instances``,
``ImageList``) is involved.
"""

from typing import Optional, Tuple

import torch
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from torch import Tensor, nn
from torch.nn import functional as F

from .detections import anchor_centers, class_wise_nms, image_candidates, select_detections

__all__ = ["DeployableGFocalV2", "class_wise_nms"]


class DeployableGFocalV2(nn.Module):
    """One image, any size: ``(1, 3, H, W)`` raw pixels -> detections (see the module doc).

    Args:
        model: a ``GFocalV2`` in eval mode (optimized for inference or not).
        score_threshold: the minimum joint score of a detection; default the model's
            ``test_score_thresh`` (``MODEL.GFOCAL.SCORE_THRESH_TEST``).

    ``forward(image, score_threshold=None)`` takes a float tensor ``(1, 3, H, W)`` of pixel
    values in the model's input format, already resized as at test time, and optionally a ()
    float tensor that replaces ``score_threshold`` (an input of the exported graph), and
    returns ``boxes`` (D, 4) XYXY in that image's pixels, ``scores`` (D,) and ``classes`` (D,)
    int64, D <= ``max_detections_per_image``, by decreasing score: the detections of
    ``model([{"image": image[0]}])``.
    """

    def __init__(self, model: nn.Module, score_threshold: Optional[float] = None):
        super().__init__()
        self.model = model
        self.score_threshold = float(
            model.test_score_thresh if score_threshold is None else score_threshold
        )
        self.eval()

    def forward(
        self, image: Tensor, score_threshold: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor, Tensor]:
        model = self.model
        if score_threshold is None:
            score_threshold = torch.tensor(self.score_threshold, device=image.device)
        height, width = image.shape[-2:]
        x = (image - model.pixel_mean) / model.pixel_std
        div = model.backbone.size_divisibility
        if div > 1:  # as ImageList.from_tensors: zeros right and bottom
            # written as div * ceil(size / div), so that the exporter sees a multiple of div
            padded_height = (height + div - 1) // div * div
            padded_width = (width + div - 1) // div * div
            x = F.pad(x, (0, padded_width - width, 0, padded_height - height))
        features = model.backbone(x)
        features = [features[f] for f in model.head_in_features]
        cls_logits, box_logits, quality_logits = model.head(features)
        if not model.dgqp_enabled:
            quality_logits = [None] * len(cls_logits)
        generator = model.anchor_generator
        centers = anchor_centers(
            [f.shape[-2:] for f in features], generator.strides, generator.offset, image.device
        )
        num_classes, bins = model.num_classes, 4 * (model.reg_max + 1)
        scores = [
            model.joint_scores(
                permute_to_N_HWA_K(cls, num_classes)[0],
                None if quality is None else permute_to_N_HWA_K(quality, 1)[0],
            )
            for cls, quality in zip(cls_logits, quality_logits)
        ]  # per level (A_l, C)
        boxes, scores = image_candidates(
            centers,
            generator.strides,
            scores,
            [permute_to_N_HWA_K(box, bins)[0] for box in box_logits],
            (height, width),
            model.test_topk_candidates,
            model.reg_max,
        )
        return select_detections(
            boxes,
            scores,
            score_threshold,
            model.test_nms_thresh,
            model.max_detections_per_image,
        )
