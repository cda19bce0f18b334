"""ATSS helpers shared by the ATSS tests: anchors on a grid, random boxes, and a slow,
per-ground-truth reference assignment written from the paper."""

import math

import torch


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
    level_of = [j for j, lvl in enumerate(levels) for _ in range(len(lvl))]
    A = len(anchors)
    best = [(-math.inf, 0)] * A
    for g, box in enumerate(gts):
        gcx, gcy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        candidates = []
        for j in range(len(levels)):
            idx = [i for i in range(A) if level_of[i] == j]
            dist = lambda i, gcx=gcx, gcy=gcy: (
                ((anchors[i][0] + anchors[i][2]) / 2 - gcx) ** 2
                + ((anchors[i][1] + anchors[i][3]) / 2 - gcy) ** 2
            )
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
