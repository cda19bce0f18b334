"""The fast ATSS (top-k on packed (distance, index) keys, IoUs of candidates only) gives
exactly the assignment of the straightforward version (stable full sort of all distances,
IoU of every anchor with every box), on realistic sizes and on grid-aligned boxes full of
distance and IoU ties."""

import math

import pytest
import torch

from detectron2.structures import Boxes, pairwise_iou

from gfocalv2.modeling import atss_assign
from gfocalv2.modeling.atss import _nearest


def sort_based_atss(anchors, num_per_level, gt_boxes, gt_valid, topk=9, min_inside=0.01):
    """The first, simplest vectorized version (kept here as the reference)."""
    N, G = gt_boxes.shape[:2]
    A = anchors.shape[0]
    ious = (
        pairwise_iou(Boxes(anchors), Boxes(gt_boxes.reshape(-1, 4)))
        .reshape(A, N, G)
        .permute(1, 0, 2)
    )
    anchor_centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    gt_centers = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2
    candidates, start = [], 0
    for num in num_per_level:
        dist = (
            (anchor_centers[start : start + num][None, :, None, :] - gt_centers[:, None, :, :])
            .pow(2)
            .sum(-1)
        )
        candidates.append(torch.sort(dist, dim=1, stable=True).indices[:, : min(topk, num)] + start)
        start += num
    candidates = torch.cat(candidates, dim=1)
    cious = ious.gather(1, candidates)
    threshold = cious.mean(dim=1, keepdim=True) + cious.std(dim=1, keepdim=True)
    cx, cy = anchor_centers[:, 0][candidates], anchor_centers[:, 1][candidates]
    x0, y0, x1, y1 = (gt_boxes[..., i][:, None, :] for i in range(4))
    inside = torch.stack([cx - x0, cy - y0, x1 - cx, y1 - cy], dim=-1).amin(dim=-1) > min_inside
    pos = (cious >= threshold) & inside & gt_valid[:, None, :]
    claimed = torch.full_like(ious, float("-inf")).scatter_(
        1, candidates, torch.where(pos, cious, torch.full_like(cious, float("-inf")))
    )
    best, matched = claimed.max(dim=2)
    is_pos = best > float("-inf")
    return torch.where(is_pos, matched, torch.zeros_like(matched)), is_pos


def grid_anchors(h, w, strides=(8, 16, 32, 64, 128), scale=8):
    levels = []
    for s in strides:
        ys, xs = (
            torch.arange(math.ceil(h / s)) * float(s),
            torch.arange(math.ceil(w / s)) * float(s),
        )
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        c = torch.stack([cx.reshape(-1), cy.reshape(-1)], 1)
        levels.append(torch.cat([c - scale * s / 2, c + scale * s / 2], 1))
    return torch.cat(levels), [len(lvl) for lvl in levels]


def boxes(g, n, h, w, snap=None):
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h])
    wh = torch.rand(n, 2, generator=g) ** 2 * torch.tensor([w, h]) * 0.5 + 2
    b = torch.cat([xy, (xy + wh).minimum(torch.tensor([float(w), float(h)]))], 1)
    return (b / snap).round() * snap if snap else b


@pytest.mark.parametrize("seed", range(6))
def test_same_assignment_as_sort_based(seed):
    g = torch.Generator().manual_seed(seed)
    h, w = (
        int(torch.randint(64, 480, (1,), generator=g)),
        int(torch.randint(64, 480, (1,), generator=g)),
    )
    anchors, nums = grid_anchors(h, w)
    snap = (None, 8.0, 4.0)[seed % 3]  # grid-aligned boxes: many equal distances and IoUs
    G = 1 + seed * 7
    gt = torch.stack([boxes(g, G, h, w, snap) for _ in range(2)])
    gt[1, 0] = gt[0, 0]
    gt[0, -1] = gt[0, 0]  # a duplicate box
    valid = torch.rand(2, G, generator=g) > 0.2
    for topk in (1, 9, 40):
        want = sort_based_atss(anchors, nums, gt, valid, topk)
        got = atss_assign(anchors, nums, gt, valid, topk)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (seed, topk)
    assert want[1].any()


def test_same_assignment_at_coco_size():
    g = torch.Generator().manual_seed(0)
    anchors, nums = grid_anchors(800, 1344)
    gt = torch.stack([boxes(g, 40, 800, 1333), boxes(g, 40, 800, 1333, snap=8.0)])
    valid = torch.ones(2, 40, dtype=torch.bool)
    want, got = sort_based_atss(anchors, nums, gt, valid), atss_assign(anchors, nums, gt, valid)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert want[1].sum() > 200


def test_nearest_breaks_ties_by_lowest_index():
    centers = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 1.0], [1.0, -1.0], [5.0, 5.0]])
    point = torch.tensor([[[1.0, 0.0]]])  # equally far (1) from anchors 0, 1, 2, 3
    assert _nearest(centers, point, 3)[0, :, 0].tolist() == [0, 1, 2]
    assert _nearest(centers.double(), point.double(), 3)[0, :, 0].tolist() == [
        0,
        1,
        2,
    ]  # sort fallback
