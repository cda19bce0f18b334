"""Adaptive Training Sample Selection (ATSS, Zhang et al. 2020), vectorized over images,
ground truths and anchors.

For every ground-truth box: on each pyramid level take the ``topk`` anchors whose
centres are closest to the box centre; the IoU threshold is the mean plus the
(unbiased) standard deviation of those candidates' IoUs; a candidate is positive if
its IoU reaches the threshold and its centre lies inside the box by more than
``min_inside`` on every side. An anchor claimed by several boxes goes to the one with
the highest IoU (the lowest box index on ties). Ties in distance are broken by the
lowest anchor index, so the assignment is deterministic.
"""
from typing import List, Tuple

import torch
from torch import Tensor

from detectron2.structures import Boxes, pairwise_iou

__all__ = ["atss_assign"]


@torch.no_grad()
def atss_assign(
    anchors: Tensor,
    num_anchors_per_level: List[int],
    gt_boxes: Tensor,
    gt_valid: Tensor,
    topk: int = 9,
    min_inside: float = 0.01,
) -> Tuple[Tensor, Tensor]:
    """Assign anchors to ground-truth boxes.

    Args:
        anchors: (A, 4) XYXY anchors of all levels, concatenated from the finest level.
        num_anchors_per_level: anchors on each level, summing to A.
        gt_boxes: (N, G, 4) XYXY ground-truth boxes per image, padded to G.
        gt_valid: (N, G) bool, False for padding.
        topk: candidates per level and ground truth.
        min_inside: how far (in pixels) an anchor centre must lie inside a box.

    Returns:
        matched_idx: (N, A) int64 index into G of each anchor's box (0 where negative).
        is_pos: (N, A) bool.
    """
    N, G = gt_boxes.shape[:2]
    A = anchors.shape[0]
    if G == 0:  # no boxes in the whole batch (a static shape, not a device sync)
        zeros = torch.zeros((N, A), dtype=torch.long, device=anchors.device)
        return zeros, zeros.bool()

    # (N, A, G) IoU of every anchor with every box.
    ious = pairwise_iou(Boxes(anchors), Boxes(gt_boxes.reshape(-1, 4))).reshape(A, N, G).permute(1, 0, 2)
    anchor_centers = (anchors[:, :2] + anchors[:, 2:]) / 2  # (A, 2)
    gt_centers = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # (N, G, 2)

    candidates = []
    start = 0
    for num in num_anchors_per_level:
        centers = anchor_centers[start : start + num]  # (A_l, 2)
        # Squared distances rank exactly as distances do. (N, A_l, G)
        dist = (centers[None, :, None, :] - gt_centers[:, None, :, :]).pow(2).sum(-1)
        k = min(topk, num)
        order = torch.sort(dist, dim=1, stable=True).indices[:, :k]  # (N, k, G)
        candidates.append(order + start)
        start += num
    candidates = torch.cat(candidates, dim=1)  # (N, K, G), K = sum of per-level k

    candidate_ious = ious.gather(1, candidates)  # (N, K, G)
    threshold = candidate_ious.mean(dim=1, keepdim=True) + candidate_ious.std(dim=1, keepdim=True)

    cx = anchor_centers[:, 0][candidates]  # (N, K, G)
    cy = anchor_centers[:, 1][candidates]
    x0, y0, x1, y1 = (gt_boxes[..., i][:, None, :] for i in range(4))  # (N, 1, G) each
    inside = torch.stack([cx - x0, cy - y0, x1 - cx, y1 - cy], dim=-1).amin(dim=-1) > min_inside

    is_candidate_pos = (candidate_ious >= threshold) & inside & gt_valid[:, None, :]
    neg_inf = torch.full_like(candidate_ious, float("-inf"))
    claimed = torch.full_like(ious, float("-inf")).scatter_(
        1, candidates, torch.where(is_candidate_pos, candidate_ious, neg_inf)
    )  # (N, A, G): IoU where the anchor is a positive candidate of the box, else -inf
    best_iou, matched_idx = claimed.max(dim=2)  # first maximum on ties
    is_pos = best_iou > float("-inf")
    return torch.where(is_pos, matched_idx, torch.zeros_like(matched_idx)), is_pos
