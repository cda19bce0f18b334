"""QFL, DFL, GIoU and the integral decoding against the papers' formulas, computed
independently with Python loops in float64."""

import math

import pytest
import torch

from gfocalv2.modeling import (
    box_to_distance,
    distance_to_box,
    distribution_focal_loss,
    distribution_to_distance,
    quality_focal_loss,
)


def qfl_reference(pred, label, score, beta):
    """GFL eq. (5), per sample, summed over classes; pred are probabilities."""
    out = []
    for i in range(pred.shape[0]):
        total = 0.0
        for c in range(pred.shape[1]):
            s = float(pred[i, c])
            y = float(score[i]) if int(label[i]) == c else 0.0
            log_s = max(math.log(s), -100.0) if s > 0 else -100.0
            log_1s = max(math.log(1 - s), -100.0) if s < 1 else -100.0
            total += -(abs(y - s) ** beta) * ((1 - y) * log_1s + y * log_s)
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def test_qfl_matches_formula_on_probabilities():
    g = torch.Generator().manual_seed(1)
    N, C = 12, 5
    pred = torch.rand(N, C, generator=g, dtype=torch.float64) * 0.98 + 0.01
    label = torch.randint(0, C + 1, (N,), generator=g)  # C = background
    score = torch.rand(N, generator=g, dtype=torch.float64)
    for beta in (2.0, 1.5):
        got = quality_focal_loss(pred, label, score, beta=beta)
        want = qfl_reference(pred, label, score, beta)
        assert got.shape == (N,)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_qfl_with_logits_equals_probability_form():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(20, 7, generator=g, dtype=torch.float64) * 3
    label = torch.randint(0, 8, (20,), generator=g)
    score = torch.rand(20, generator=g, dtype=torch.float64)
    got = quality_focal_loss(logits, label, score, use_sigmoid=True)
    want = qfl_reference(logits.sigmoid(), label, score, 2.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_qfl_background_rows_only_penalize_scores():
    pred = torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.0, 0.0]])
    label = torch.tensor([3, 3])
    loss = quality_focal_loss(pred, label, torch.zeros(2))
    assert loss[0].item() == 0.0
    assert loss[1].item() == pytest.approx(-(0.3**2) * math.log(0.7), rel=1e-5)


def test_qfl_is_float32_under_autocast():
    pred = torch.rand(4, 3, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = quality_focal_loss(pred, torch.tensor([0, 1, 2, 3]), torch.rand(4))
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()


def dfl_reference(logits, y):
    out = []
    for i in range(logits.shape[0]):
        row = [float(v) for v in logits[i]]
        m = max(row)
        log_z = m + math.log(sum(math.exp(v - m) for v in row))
        yl = math.floor(float(y[i]))
        yr = yl + 1
        out.append(
            -((yr - float(y[i])) * (row[yl] - log_z) + (float(y[i]) - yl) * (row[yr] - log_z))
        )
    return torch.tensor(out, dtype=torch.float64)


def test_dfl_matches_formula():
    g = torch.Generator().manual_seed(3)
    n = 16
    logits = torch.randn(30, n + 1, generator=g, dtype=torch.float64)
    y = torch.rand(30, generator=g, dtype=torch.float64) * (n - 0.01)
    y[0], y[1] = 0.0, 3.0  # integer targets put all weight on the left bin
    got = distribution_focal_loss(logits, y)
    torch.testing.assert_close(got.double(), dfl_reference(logits, y), rtol=1e-5, atol=1e-6)


def test_dfl_minimum_at_two_bin_distribution():
    """The loss is minimal when the softmax puts (y_r - y) on y_l and (y - y_l) on y_r."""
    y = torch.tensor([2.3])
    probs = torch.full((1, 5), 1e-9)
    probs[0, 2], probs[0, 3] = 0.7, 0.3
    best = distribution_focal_loss(probs.log(), y)
    other = distribution_focal_loss(torch.tensor([[0.0, 0.0, 1.0, 0.5, 0.0]]), y)
    assert best.item() < other.item()


def test_integral_is_expectation():
    g = torch.Generator().manual_seed(4)
    reg_max = 16
    logits = torch.randn(3, 5, 4 * (reg_max + 1), generator=g)
    got = distribution_to_distance(logits, reg_max)
    assert got.shape == (3, 5, 4)
    for i in range(3):
        for j in range(5):
            for side in range(4):
                row = logits[i, j, side * (reg_max + 1) : (side + 1) * (reg_max + 1)].double()
                p = torch.softmax(row, 0)
                want = sum(float(p[k]) * k for k in range(reg_max + 1))
                assert got[i, j, side].item() == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_box_distance_round_trip():
    pts = torch.tensor([[10.0, 20.0], [0.0, 0.0]])
    dist = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]])
    boxes = distance_to_box(pts, dist)
    torch.testing.assert_close(
        boxes, torch.tensor([[9.0, 18.0, 13.0, 24.0], [-0.5, -0.5, 0.5, 0.5]])
    )
    torch.testing.assert_close(box_to_distance(pts, boxes), dist)


def giou_reference(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    iou = inter / union
    return 1 - (iou - (hull - union) / hull)


def test_giou_loss_used_by_the_model_matches_formula():
    from fvcore.nn import giou_loss

    g = torch.Generator().manual_seed(5)
    xy = torch.rand(25, 2, generator=g, dtype=torch.float64) * 50
    a = torch.cat([xy, xy + torch.rand(25, 2, generator=g, dtype=torch.float64) * 30 + 1], 1)
    xy = torch.rand(25, 2, generator=g, dtype=torch.float64) * 50
    b = torch.cat([xy, xy + torch.rand(25, 2, generator=g, dtype=torch.float64) * 30 + 1], 1)
    got = giou_loss(a, b, reduction="none")
    want = torch.tensor(
        [giou_reference(a[i].tolist(), b[i].tolist()) for i in range(25)], dtype=torch.float64
    )
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
