"""Adaptive Training Sample Selection (ATSS, Zhang et al. 2020), vectorized over images,
ground truths and anchors.

For every ground-truth box: on each pyramid level take the ``topk`` anchors whose
centres are closest to the box centre; the IoU threshold is the mean plus the
(unbiased) standard deviation of those candidates' IoUs; a candidate is positive if
its IoU reaches the threshold and its centre lies inside the box by more than
``min_inside`` on every side. An anchor claimed by several boxes goes to the one with
the highest IoU (the lowest box index on ties). Ties in distance are broken by the
lowest anchor index, so the assignment is deterministic.

Anchors can be marked invalid per image (those outside the image's own padded size, in
a batch of images of different sizes): as in the reference, which assigns each image on
its valid anchors only, they are never candidates, so they neither become positive nor
enter the IoU statistics; a level with fewer valid anchors than ``topk`` gives fewer
candidates.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["atss_assign"]


@torch.no_grad()
def atss_assign(
    anchors: Tensor,
    num_anchors_per_level: List[int],
    gt_boxes: Tensor,
    gt_valid: Tensor,
    topk: int = 9,
    min_inside: float = 0.01,
    anchor_valid: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Assign anchors to ground-truth boxes.

    Args:
        anchors: (A, 4) XYXY anchors of all levels, concatenated from the finest level.
        num_anchors_per_level: anchors on each level, summing to A.
        gt_boxes: (N, G, 4) XYXY ground-truth boxes per image, padded to G.
        gt_valid: (N, G) bool, False for padding.
        topk: candidates per level and ground truth.
        min_inside: how far (in pixels) an anchor centre must lie inside a box.
        anchor_valid: optional (N, A) bool, False for anchors that image must ignore (never
            candidates); None: all valid (the unmasked computation, bit for bit).

    Returns:
        matched_idx: (N, A) int64 index into G of each anchor's box (0 where negative).
        is_pos: (N, A) bool.
    """
    N, G = gt_boxes.shape[:2]
    A = anchors.shape[0]
    if G == 0:  # no boxes in the whole batch (a static shape, not a device sync)
        zeros = torch.zeros((N, A), dtype=torch.long, device=anchors.device)
        return zeros, zeros.bool()

    anchor_centers = (anchors[:, :2] + anchors[:, 2:]) / 2  # (A, 2)
    gt_centers = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # (N, G, 2)
    candidates = []
    start = 0
    for num in num_anchors_per_level:
        valid = None if anchor_valid is None else anchor_valid[:, start : start + num]
        nearest = _nearest(
            anchor_centers[start : start + num], gt_centers, min(topk, num), valid
        )  # (N, k, G)
        candidates.append(nearest + start)
        start += num
    candidates = torch.cat(candidates, dim=1)  # (N, K, G), K = sum of per-level k

    # IoUs of the candidates only: the IoU of every anchor with every box is never needed.
    candidate_ious = _iou(anchors[candidates], gt_boxes[:, None])  # (N, K, G)
    if anchor_valid is None:
        threshold = candidate_ious.mean(dim=1, keepdim=True) + candidate_ious.std(
            dim=1, keepdim=True
        )
        candidate_valid = None
    else:
        # Invalid anchors are ranked last on each level, so they are among the candidates
        # only where a level has fewer than topk valid anchors: leave them out of the
        # statistics (mean and unbiased std over the valid candidates, as the reference).
        candidate_valid = anchor_valid.gather(1, candidates.flatten(1)).view_as(
            candidates
        )  # (N, K, G)
        threshold = _masked_mean_plus_std(candidate_ious, candidate_valid)

    cx = anchor_centers[:, 0][candidates]  # (N, K, G)
    cy = anchor_centers[:, 1][candidates]
    x0, y0, x1, y1 = (gt_boxes[..., i][:, None, :] for i in range(4))  # (N, 1, G) each
    inside = torch.stack([cx - x0, cy - y0, x1 - cx, y1 - cy], dim=-1).amin(dim=-1) > min_inside

    is_candidate_pos = (candidate_ious >= threshold) & inside & gt_valid[:, None, :]
    if candidate_valid is not None:
        is_candidate_pos &= candidate_valid
    neg_inf = torch.full_like(candidate_ious, float("-inf"))
    claimed = torch.full(
        (N, A, G), float("-inf"), dtype=candidate_ious.dtype, device=anchors.device
    ).scatter_(
        1, candidates, torch.where(is_candidate_pos, candidate_ious, neg_inf)
    )  # (N, A, G): IoU where the anchor is a positive candidate of the box, else -inf
    best_iou, matched_idx = claimed.max(dim=2)  # first maximum on ties
    is_pos = best_iou > float("-inf")
    return torch.where(is_pos, matched_idx, torch.zeros_like(matched_idx)), is_pos


def _masked_mean_plus_std(values: Tensor, mask: Tensor) -> Tensor:
    """Mean plus unbiased standard deviation over dim 1 of the (N, K, G) ``values`` where
    ``mask``; (N, 1, G). NaN where fewer than 2 values count, as ``Tensor.std``."""
    count = mask.sum(dim=1, keepdim=True).to(values.dtype)
    zero = torch.zeros_like(values)
    mean = torch.where(mask, values, zero).sum(dim=1, keepdim=True) / count
    var = torch.where(mask, (values - mean) ** 2, zero).sum(dim=1, keepdim=True) / (count - 1)
    return mean + var.sqrt()


def _nearest(centers: Tensor, points: Tensor, k: int, valid: Optional[Tensor] = None) -> Tensor:
    """The ``k`` centres nearest to each point, by (distance, index).

    Args:
        centers: (A_l, 2) anchor centres of one level; points: (N, G, 2); k <= A_l.
        valid: optional (N, A_l) bool: invalid centres of an image rank after all its valid
            ones (infinitely far), still by index among themselves.

    Returns:
        (N, k, G) indices into ``centers``, nearest first; equal distances: lowest index first.
    """
    # Squared distances rank exactly as distances do. (N, G, A_l), anchors last for top-k;
    # dx * dx + dy * dy, the same floats as pow(2).sum(-1) without a reduction over 2 values.
    dx = points[:, :, None, 0] - centers[:, 0]
    dy = points[:, :, None, 1] - centers[:, 1]
    dist = dx * dx + dy * dy
    if valid is not None:
        # +inf, not a large number: its float bits still order above every finite distance.
        dist = torch.where(valid[:, None, :], dist, torch.full_like(dist, float("inf")))
    index = torch.arange(centers.shape[0], device=centers.device)
    if dist.dtype == torch.float32:
        # Top-k instead of a full sort (~10x fewer operations). Ties must go to the lowest
        # index, which top-k does not promise, so rank unique int64 keys instead:
        # (float bits << 32) | index. The bits of non-negative floats order as the floats.
        key = (dist.view(torch.int32).long() << 32) | index
        order = key.topk(k, dim=-1, largest=False, sorted=True).indices
    else:  # no such bit trick at hand: a stable full sort
        order = torch.sort(dist, dim=-1, stable=True).indices[..., :k]
    return order.transpose(1, 2)


def _iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of (..., 4) XYXY boxes broadcast against (..., 4) boxes, computed as Detectron2's
    ``pairwise_iou`` does (same operations, same results; 0 where the boxes do not overlap)."""
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    wh = (
        torch.min(boxes1[..., 2:], boxes2[..., 2:]) - torch.max(boxes1[..., :2], boxes2[..., :2])
    ).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return torch.where(inter > 0, inter / (area1 + area2 - inter), torch.zeros_like(inter))
