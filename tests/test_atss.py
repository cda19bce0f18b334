"""Vectorized ATSS against a slow, per-ground-truth reference written from the paper."""
import math

import pytest
import torch

from gfocalv2.modeling import atss_assign


def make_anchors(image_hw, strides=(8, 16, 32), scale=8):
    """Square anchors of side scale x stride centred at k x stride (offset 0), per level."""
    levels = []
    H, W = image_hw
    for s in strides:
        ys = torch.arange(0, math.ceil(H / s)) * float(s)
        xs = torch.arange(0, math.ceil(W / s)) * float(s)
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        c = torch.stack([cx.reshape(-1), cy.reshape(-1)], 1)
        half = scale * s / 2
        levels.append(torch.cat([c - half, c + half], 1))
    return levels


def iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if inter > 0 else 0.0


def atss_reference(levels, gts, topk=9):
    """One image. Returns (matched_idx, is_pos) lists over all anchors."""
    anchors = [a.tolist() for lvl in levels for a in lvl]
    level_of = [l for l, lvl in enumerate(levels) for _ in range(len(lvl))]
    A = len(anchors)
    best = [(-math.inf, 0)] * A
    for g, box in enumerate(gts):
        gcx, gcy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        candidates = []
        for l in range(len(levels)):
            idx = [i for i in range(A) if level_of[i] == l]
            dist = lambda i: ((anchors[i][0] + anchors[i][2]) / 2 - gcx) ** 2 + ((anchors[i][1] + anchors[i][3]) / 2 - gcy) ** 2
            candidates += sorted(idx, key=lambda i: (dist(i), i))[:topk]  # ties: lowest index
        ious = [iou(anchors[i], box) for i in candidates]
        mean = sum(ious) / len(ious)
        std = math.sqrt(sum((v - mean) ** 2 for v in ious) / (len(ious) - 1))
        for i, v in zip(candidates, ious):
            cx, cy = (anchors[i][0] + anchors[i][2]) / 2, (anchors[i][1] + anchors[i][3]) / 2
            inside = min(cx - box[0], cy - box[1], box[2] - cx, box[3] - cy) > 0.01
            if v >= mean + std and inside and v > best[i][0]:  # strict: lowest gt index wins ties
                best[i] = (v, g)
    return [b[1] if b[0] > -math.inf else 0 for b in best], [b[0] > -math.inf for b in best]


def random_boxes(g, n, H, W):
    xy = torch.rand(n, 2, generator=g) * torch.tensor([W, H])
    wh = torch.rand(n, 2, generator=g) ** 2 * torch.tensor([W, H]) * 0.6 + 2
    return torch.cat([xy, (xy + wh).minimum(torch.tensor([W, H], dtype=torch.float))], 1)


def run_both(levels, per_image_gts, topk=9):
    anchors = torch.cat(levels)
    G = max([1] + [len(b) for b in per_image_gts])
    N = len(per_image_gts)
    boxes = torch.zeros(N, G, 4)
    valid = torch.zeros(N, G, dtype=torch.bool)
    for i, b in enumerate(per_image_gts):
        boxes[i, : len(b)] = b
        valid[i, : len(b)] = True
    matched, pos = atss_assign(anchors, [len(l) for l in levels], boxes, valid, topk)
    for i, b in enumerate(per_image_gts):
        want_matched, want_pos = atss_reference(levels, b.tolist(), topk)
        assert pos[i].tolist() == want_pos, f"image {i}: positives differ"
        assert matched[i][pos[i]].tolist() == torch.tensor(want_matched)[torch.tensor(want_pos, dtype=torch.bool)].tolist()
    return matched, pos


def test_atss_random_boxes_batch():
    g = torch.Generator().manual_seed(0)
    levels = make_anchors((96, 128))
    gts = [random_boxes(g, 6, 96, 128), random_boxes(g, 3, 96, 128), torch.zeros(0, 4)]
    matched, pos = run_both(levels, gts)
    assert pos[0].sum() > 0 and pos[1].sum() > 0
    assert pos[2].sum() == 0  # an image with no ground truth has no positives


def test_atss_ties_small_boxes_and_borders():
    levels = make_anchors((64, 64))
    gts = torch.tensor(
        [
            [12.0, 12.0, 20.0, 20.0],  # centre (16, 16) sits on an anchor centre
            [4.0, 4.0, 28.0, 28.0],  # same centre, larger: IoU ties with the first are possible
            [30.0, 30.0, 33.0, 33.0],  # smaller than a stride
            [0.0, 0.0, 10.0, 64.0],  # touching the image border
            [54.0, 40.0, 64.0, 64.0],  # at the far corner
            [12.0, 12.0, 20.0, 20.0],  # exact duplicate of box 0: ties in IoU -> lowest index
        ]
    )
    matched, pos = run_both(levels, [gts])
    # The duplicate never wins over the original.
    assert not (matched[0][pos[0]] == 5).any()


def test_atss_no_ground_truth_in_batch():
    levels = make_anchors((32, 32))
    anchors = torch.cat(levels)
    matched, pos = atss_assign(anchors, [len(l) for l in levels], torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool))
    assert matched.shape == (2, len(anchors)) and not pos.any()


@pytest.mark.parametrize("topk", [1, 3, 50])
def test_atss_topk_variants(topk):
    """topk = 1 gives a nan std (one candidate per level is fine with several levels); topk larger than a level."""
    g = torch.Generator().manual_seed(topk)
    levels = make_anchors((48, 64))
    run_both(levels, [random_boxes(g, 4, 48, 64)], topk=topk)
