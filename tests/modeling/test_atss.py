"""Vectorized ATSS against a slow, per-ground-truth reference written from the paper."""

import pytest
import torch

from gfocalv2.modeling import atss_assign
from tests.utils.atss import atss_reference, make_anchors, random_boxes


def run_both(levels, per_image_gts, topk=9):
    anchors = torch.cat(levels)
    G = max([1] + [len(b) for b in per_image_gts])
    N = len(per_image_gts)
    boxes = torch.zeros(N, G, 4)
    valid = torch.zeros(N, G, dtype=torch.bool)
    for i, b in enumerate(per_image_gts):
        boxes[i, : len(b)] = b
        valid[i, : len(b)] = True
    matched, pos = atss_assign(anchors, [len(lvl) for lvl in levels], boxes, valid, topk)
    for i, b in enumerate(per_image_gts):
        want_matched, want_pos = atss_reference(levels, b.tolist(), topk)
        assert pos[i].tolist() == want_pos, f"image {i}: positives differ"
        assert (
            matched[i][pos[i]].tolist()
            == torch.tensor(want_matched)[torch.tensor(want_pos, dtype=torch.bool)].tolist()
        )
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
    matched, pos = atss_assign(
        anchors, [len(a) for a in levels], torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool)
    )
    assert matched.shape == (2, len(anchors)) and not pos.any()


@pytest.mark.parametrize("topk", [1, 3, 50])
def test_atss_topk_variants(topk):
    """topk = 1 gives a nan std (one candidate per level is fine with several levels); topk larger
    than a level."""
    g = torch.Generator().manual_seed(topk)
    levels = make_anchors((48, 64))
    run_both(levels, [random_boxes(g, 4, 48, 64)], topk=topk)
