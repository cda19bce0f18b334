"""GFocalV2 / GFL detections from the head's outputs: the steps after the head, written once.

Used by the model (:meth:`GFocalV2.forward_inference`), the exported graph
(:class:`~gfocalv2.modeling.deploy.DeployableGFocalV2`) and test-time augmentation
(:class:`~gfocalv2.test_time_augmentation.GFocalV2WithTTA`)::

    per level:  anchor centres -> the k locations of highest best-class score -> decoded boxes
    per image:  clipped to the image, empty boxes dropped -> candidates (boxes, scores)
    candidates of one image (or of all views of an image) -> class-wise NMS -> best detections

Written with operations whose output sizes follow the input's, so that ``torch.export`` (with a
dynamic height and width) traces the same code the model runs: no Detectron2 structure, no
Python branch on data, the same ``k`` per level for every input size. A candidate that is not
one (a placeholder of the top-k, a location outside its image's own padded size, a box left
empty by clipping) keeps its row and gets the score :data:`NOT_A_CANDIDATE`, below every score
threshold, so the candidate tensors of an image have a size that does not depend on the data.
"""

from typing import List, Optional, Sequence, Tuple

import torch
import torchvision
from torch import Tensor

from .box_coder import distance_to_box, distribution_to_distance

__all__ = [
    "NOT_A_CANDIDATE",
    "anchor_centers",
    "level_candidates",
    "image_candidates",
    "clip_candidates",
    "select_detections",
    "class_wise_nms",
]

#: The score of a candidate row that is not a candidate: below every joint score (>= 0) and so
#: below every score threshold.
NOT_A_CANDIDATE = -1.0


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

    One operation, so that the ONNX exporter (``gfocalv2.export``) translates it to the ONNX
    operator: with the boxes of all classes offset into one NMS (what
    ``torchvision.ops.batched_nms`` exports), onnxruntime compares every candidate with every
    box already kept, of any class, and the post-processing of a trained model took longer
    than its network. In PyTorch it runs torchvision's ``batched_nms`` (Detectron2's
    ``batched_nms`` is the same function on current Detectron2).
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


def anchor_centers(
    feature_sizes: Sequence[Tuple[int, int]],
    strides: Sequence[float],
    offset: float,
    device: torch.device,
) -> List[Tensor]:
    """Per level, the (H_l * W_l, 2) anchor centres (x, y), row-major, where Detectron2's
    ``DefaultAnchorGenerator`` places its single anchor per location: ``(i + offset) * stride``.

    Args:
        feature_sizes: per level (H_l, W_l) (symbolic sizes while exporting).
    """
    centers = []
    for (h, w), stride in zip(feature_sizes, strides):
        xs = (torch.arange(w, device=device, dtype=torch.float32) + offset) * stride
        ys = (torch.arange(h, device=device, dtype=torch.float32) + offset) * stride
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        centers.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1))
    return centers


def level_candidates(
    centers: Tensor,
    stride: float,
    scores: Tensor,
    box_logits: Tensor,
    k: int,
    reg_max: int,
    valid: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """The ``k`` locations of one level with the highest best-class score, decoded.

    Args:
        centers: (A, 2) anchor centres; stride: the level's stride.
        scores: (A, C) joint scores in [0, 1]; box_logits: (A, 4 * (reg_max + 1)).
        valid: (A,) bool, False for locations outside the image's own padded size (the
            padding for a larger image of the batch); None: all valid.

    Returns:
        (k, 4) boxes in pixels and (k, C) scores; rows that are not candidates (placeholders
        when A < k, invalid locations) score :data:`NOT_A_CANDIDATE`.

    The ranking gets ``k`` placeholders that rank below every location, so that ``k`` is the
    same for every level size (an exported graph must not depend on which of ``k`` and A is
    smaller); invalid locations rank between the two, so the top-k of an image in a batch is
    the one it gets alone.
    """
    num_locations = scores.shape[0]
    rank = scores.amax(dim=1)  # (A,)
    if valid is not None:
        rank = torch.where(valid, rank, torch.full_like(rank, -1.0))
    rank = torch.cat([rank, rank.new_full((k,), -2.0)])
    top = rank.topk(k).indices  # (k,)
    is_candidate = top < num_locations
    top = top.clamp(max=num_locations - 1)
    if valid is not None:
        is_candidate = is_candidate & valid[top]
    distances = distribution_to_distance(box_logits[top], reg_max) * stride
    boxes = distance_to_box(centers[top], distances)
    scores = torch.where(is_candidate[:, None], scores[top], NOT_A_CANDIDATE)
    return boxes, scores


def clip_candidates(boxes: Tensor, scores: Tensor, height, width) -> Tuple[Tensor, Tensor]:
    """Boxes clipped to an image of ``height`` x ``width`` (as ``Boxes.clip``); those left empty
    (zero width or height: a location outside the image regressing into the padding only)
    stop being candidates, as MMDetection's ``min_bbox_size=0`` filter: they would take
    detection slots, and no consumer of the detections wants them.

    Args:
        boxes: (K, 4) XYXY; scores: (K, C).

    Returns:
        (K, 4) clipped boxes and (K, C) scores.
    """
    x1 = boxes[:, 0].clamp(min=0, max=width)
    y1 = boxes[:, 1].clamp(min=0, max=height)
    x2 = boxes[:, 2].clamp(min=0, max=width)
    y2 = boxes[:, 3].clamp(min=0, max=height)
    nonempty = (x2 > x1) & (y2 > y1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1)
    return boxes, torch.where(nonempty[:, None], scores, NOT_A_CANDIDATE)


def image_candidates(
    centers: Sequence[Tensor],
    strides: Sequence[float],
    scores: Sequence[Tensor],
    box_logits: Sequence[Tensor],
    image_size: Tuple[int, int],
    k: int,
    reg_max: int,
    valid: Optional[Sequence[Tensor]] = None,
) -> Tuple[Tensor, Tensor]:
    """The candidates of one image: :func:`level_candidates` of every level, clipped to the
    image (:func:`clip_candidates`).

    Args:
        centers, scores, box_logits, valid: per level, as :func:`level_candidates`.
        image_size: (height, width) of the (resized, unpadded) input image.

    Returns:
        (L * k, 4) boxes and (L * k, C) scores, levels finest first.
    """
    boxes, level_scores = [], []
    for level, (center, stride, score, box) in enumerate(zip(centers, strides, scores, box_logits)):
        b, s = level_candidates(
            center, stride, score, box, k, reg_max, None if valid is None else valid[level]
        )
        boxes.append(b)
        level_scores.append(s)
    return clip_candidates(torch.cat(boxes), torch.cat(level_scores), *image_size)


def select_detections(
    boxes: Tensor,
    scores: Tensor,
    score_threshold,
    nms_threshold: float,
    max_detections: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Detections from candidates: the (candidate, class) pairs scoring above
    ``score_threshold``, class-wise NMS, the best ``max_detections``.

    Args:
        boxes: (K, 4); scores: (K, C) (rows that are not candidates score
            :data:`NOT_A_CANDIDATE`).
        score_threshold: a float or a () tensor (an input of the exported graph).

    Returns:
        boxes (D, 4), scores (D,) and classes (D,) int64, by decreasing score,
        D <= ``max_detections``.
    """
    if not isinstance(score_threshold, Tensor):
        # a CPU scalar tensor: compared with tensors of any device without a copy to it
        score_threshold = torch.tensor(float(score_threshold))
    selected = torch.ops.gfocalv2.class_wise_nms(
        boxes, scores.t().contiguous(), score_threshold, nms_threshold, max_detections
    )  # at most max_detections per class: enough for the best max_detections overall
    classes, index = selected[:, 1], selected[:, 2]
    det_scores = scores[index, classes]
    best = det_scores.topk(torch.sym_min(max_detections, det_scores.shape[0])).indices
    return boxes[index[best]], det_scores[best], classes[best]
