"""GFocalV2 / GFL inference as one graph that exports for any input size.

:class:`DeployableGFocalV2` computes what ``GFocalV2.forward_inference`` computes for one image,
with operations whose output sizes follow the input's (``torch.export`` with dynamic height
and width): normalization, zero padding to the backbone's size divisibility, backbone, head,
anchor centres from each level's feature size, per-level top-k, decoding, clipping, and
class-wise NMS; no Detectron2 structure (``Boxes``, ``Instances``, ``ImageList``) is involved.

Class-wise NMS is one operation, ``torch.ops.gfocalv2.class_wise_nms``, with the semantics of
ONNX ``NonMaxSuppression`` over a (classes, locations) score matrix: within each class, the
locations scoring above the score threshold, by decreasing score, suppressing those whose IoU
with a kept box exceeds the IoU threshold, at most ``max_per_class`` per class. In PyTorch it
runs torchvision's NMS; the ONNX exporter (``gfocalv2.export``) translates it to the ONNX
operator. Doing the NMS per class with the score threshold inside the operator keeps
onnxruntime's NMS fast: with the boxes of all classes offset into one NMS (what
``torchvision.ops.batched_nms`` exports), every candidate is compared with every box already
kept, of any class, and the post-processing of a trained model took longer than its network.
"""

from typing import Optional, Tuple

import torch
import torchvision
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from torch import Tensor, nn
from torch.nn import functional as F

from .box_coder import distance_to_box, distribution_to_distance

__all__ = ["DeployableGFocalV2", "class_wise_nms"]


@torch.library.custom_op("gfocalv2::class_wise_nms", mutates_args=())
def class_wise_nms(
    boxes: Tensor,
    scores: Tensor,
    score_threshold: Tensor,
    iou_threshold: float,
    max_per_class: int,
) -> Tensor:
    """Class-wise NMS, as ONNX ``NonMaxSuppression`` for one image.

    Args:
        boxes: (K, 4) XYXY.
        scores: (C, K) score of every (class, box) pair.
        score_threshold: () only pairs scoring above it are candidates.
        iou_threshold: a box whose IoU with a kept box of its class exceeds it is suppressed.
        max_per_class: at most this many boxes kept per class (the best).

    Returns:
        (S, 3) int64 rows ``[0, class, box index]``, by class, then by decreasing score.
    """
    classes, index = (scores > score_threshold).nonzero(as_tuple=True)
    keep = torchvision.ops.batched_nms(
        boxes[index].float(), scores[classes, index], classes, iou_threshold
    )  # by decreasing score
    classes, index = classes[keep], index[keep]
    by_class = torch.argsort(classes, stable=True)  # stable: by score within a class
    classes, index = classes[by_class], index[by_class]
    rank_in_class = torch.arange(len(classes), device=classes.device) - torch.searchsorted(
        classes, classes
    )
    kept = rank_in_class < max_per_class
    classes, index = classes[kept], index[kept]
    return torch.stack([torch.zeros_like(classes), classes, index], dim=1)


@class_wise_nms.register_fake
def _class_wise_nms_shape(boxes, scores, score_threshold, iou_threshold, max_per_class):
    num_kept = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((num_kept, 3), dtype=torch.int64)


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

    def _centers(self, features) -> Tuple[list, list]:
        """Per level: (A_l, 2) anchor centres (x, y) and the level's stride, as Detectron2's
        ``DefaultAnchorGenerator`` places its single anchor per location."""
        generator = self.model.anchor_generator
        centers = []
        for feature, stride in zip(features, generator.strides):
            h, w = feature.shape[-2:]
            xs = (
                torch.arange(w, device=feature.device, dtype=torch.float32) + generator.offset
            ) * stride
            ys = (
                torch.arange(h, device=feature.device, dtype=torch.float32) + generator.offset
            ) * stride
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            centers.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1))
        return centers, list(generator.strides)

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
        centers, strides = self._centers(features)

        num_classes, bins = model.num_classes, 4 * (model.reg_max + 1)
        cand_boxes, cand_scores = [], []
        for center, stride, cls, box, quality in zip(
            centers, strides, cls_logits, box_logits, quality_logits
        ):
            score = model.joint_scores(
                permute_to_N_HWA_K(cls, num_classes)[0],
                None if quality is None else permute_to_N_HWA_K(quality, 1)[0],
            )  # (A_l, C)
            # The top-k of the level's locations by best class score, k = min(TOPK, A_l). So
            # that k is the same for every input size (an exported graph must not depend on
            # which of the two is smaller), the ranking gets TOPK placeholders that rank below
            # every location (scores are >= 0) and stand for "no candidate": score -1.
            k = model.test_topk_candidates
            rank = score.amax(dim=1)
            rank = torch.cat([rank, rank.new_full((k,), -2.0)])
            top = rank.topk(k).indices
            is_location = top < score.shape[0]
            top = top.clamp(max=score.shape[0] - 1)
            box = permute_to_N_HWA_K(box, bins)[0][top]
            distance = distribution_to_distance(box, model.reg_max) * stride
            cand_boxes.append(distance_to_box(center[top], distance))
            cand_scores.append(torch.where(is_location[:, None], score[top], -1.0))
        boxes = torch.cat(cand_boxes)  # (K, 4)
        scores = torch.cat(cand_scores)  # (K, C)

        # Boxes.clip, then drop the boxes left empty (as forward_inference does)
        x1 = boxes[:, 0].clamp(min=0, max=width)
        y1 = boxes[:, 1].clamp(min=0, max=height)
        x2 = boxes[:, 2].clamp(min=0, max=width)
        y2 = boxes[:, 3].clamp(min=0, max=height)
        boxes = torch.stack([x1, y1, x2, y2], dim=1)
        nonempty = (x2 > x1) & (y2 > y1)
        scores = torch.where(nonempty[:, None], scores, torch.full_like(scores, -1.0))

        limit = model.max_detections_per_image
        selected = torch.ops.gfocalv2.class_wise_nms(
            boxes, scores.t().contiguous(), score_threshold, model.test_nms_thresh, limit
        )
        classes, index = selected[:, 1], selected[:, 2]
        det_scores = scores[index, classes]
        best = det_scores.topk(torch.sym_min(limit, det_scores.shape[0])).indices
        return boxes[index[best]], det_scores[best], classes[best]
