"""Training recipe parity with the authors' code (issue 13): DFL target clamp, anchors in
the batch padding, the QFL normalizer.

The losses are computed through the model's own ``forward_training`` with fixed head
predictions (random per-level maps) and dummy feature maps (the anchors only read their
shapes): the head's GroupNorm would otherwise make the predictions of an image depend on
the batch padding, and these tests are about the target and loss computation only.
"""

import math

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import ImageList

from gfocalv2.modeling import atss_assign, meta_arch
from tests.utils.models import gfocal_cfg, instances
from tests.utils.atss import atss_reference, make_anchors, random_boxes

STRIDES = (8, 16, 32, 64, 128)
DIV = 32  # the backbone's size divisibility


def padded(h, w, div=DIV):
    return math.ceil(h / div) * div, math.ceil(w / div) * div


def level_shapes(h, w):
    """Feature-map sizes of an input tensor of size (h, w) padded to DIV."""
    ph, pw = padded(h, w)
    return [(math.ceil(ph / s), math.ceil(pw / s)) for s in STRIDES]


def random_maps(g, model, shapes, n=1):
    """Per-level head outputs (cls, box, quality logits), each (n, K, H_l, W_l)."""
    C, B = model.num_classes, 4 * (model.reg_max + 1)
    cls = [torch.randn(n, C, h, w, generator=g) - 2.0 for h, w in shapes]
    box = [torch.randn(n, B, h, w, generator=g) * 2.0 for h, w in shapes]
    quality = [torch.randn(n, 1, h, w, generator=g) for h, w in shapes]
    return cls, box, quality


def embed(small, big_shapes, g, garbage_logit=6.0):
    """Maps of a small image placed top-left in maps of ``big_shapes``; the rest (the batch
    padding) holds confident garbage: class and quality logits ``garbage_logit``."""
    out = []
    for maps in small:
        level = []
        for m, (h, w) in zip(maps, big_shapes):
            big = torch.randn(1, m.shape[1], h, w, generator=g) * 2.0 + garbage_logit
            big[..., : m.shape[2], : m.shape[3]] = m
            level.append(big)
        out.append(level)
    return tuple(out)


def stack(*predictions):
    """Concatenate per-image predictions (same shapes) along the batch dimension."""
    return tuple([torch.cat(maps, 0) for maps in zip(*levels)] for levels in zip(*predictions))


def run_training(model, image_sizes, predictions, gts, monkeypatch):
    """model.forward_training on fixed predictions -> (losses, label_anchors' output)."""
    H = max(padded(*s)[0] for s in image_sizes)
    W = max(padded(*s)[1] for s in image_sizes)
    images = ImageList(torch.zeros(len(image_sizes), 3, H, W), list(image_sizes))
    features = [torch.zeros(len(image_sizes), 1, h, w) for h, w in level_shapes(H, W)]
    captured = {}
    inner = model.label_anchors

    def spy(*args, **kwargs):
        captured["labels"] = out = inner(*args, **kwargs)
        return out

    monkeypatch.setattr(model, "label_anchors", spy)
    losses = model.forward_training(images, features, predictions, gts)
    monkeypatch.undo()
    return losses, captured["labels"]


def sub_grid_index(small_shapes, big_shapes):
    """Indices, in the flattened anchors of ``big_shapes`` (levels concatenated, row-major),
    of the anchors of ``small_shapes`` (the top-left part of each level)."""
    idx, start = [], 0
    for (hs, ws), (hb, wb) in zip(small_shapes, big_shapes):
        ys, xs = torch.meshgrid(torch.arange(hs), torch.arange(ws), indexing="ij")
        idx.append(start + ys.reshape(-1) * wb + xs.reshape(-1))
        start += hb * wb
    return torch.cat(idx)


@pytest.fixture(scope="module")
def model():
    return build_model(gfocal_cfg(tiny=True))


# ------------------------------------------------------------------- 1. DFL clamp
def test_dfl_targets_of_a_long_thin_box_clamped_at_reg_max_minus_0_1(monkeypatch):
    """The reference's ``bbox2distance`` clamps the side distances (stride units) at
    reg_max - 0.1 = 15.9: the targets the model hands to the DFL never exceed it, and equal
    it exactly where the true distance is longer."""
    model = build_model(gfocal_cfg("MODEL.GFOCAL.REG_MAX", 16, tiny=True))
    assert model.reg_max == 16
    g = torch.Generator().manual_seed(10)
    h, w = 64, 1280
    box = [40.0, 24.0, 1240.0, 40.0]  # 1200 x 16 px: 600 px to each side from the centre
    gts = [instances((h, w), [box], [1])]
    predictions = random_maps(g, model, level_shapes(h, w))
    seen = {}
    dfl = meta_arch.distribution_focal_loss

    def spy_dfl(pred, label):
        seen["label"] = label.detach().clone()
        return dfl(pred, label)

    monkeypatch.setattr(meta_arch, "distribution_focal_loss", spy_dfl)
    _, labels = run_training(model, [(h, w)], predictions, gts, monkeypatch)
    anchors, strides, is_pos = labels[0], labels[1], labels[5]
    targets = seen["label"].reshape(1, -1, 4)[is_pos]  # (P, 4) of the positives
    assert len(targets) > 0
    # Independently: distances from the anchor centres to the box, in stride units.
    centers = ((anchors[:, :2] + anchors[:, 2:]) / 2)[is_pos[0]].double()
    b = torch.tensor(box, dtype=torch.float64)
    true = torch.stack(
        [centers[:, 0] - b[0], centers[:, 1] - b[1], b[2] - centers[:, 0], b[3] - centers[:, 1]], 1
    )
    true = true / strides[is_pos[0]].double()[:, None]
    limit = torch.tensor(16 - 0.1, dtype=torch.float32)
    assert targets.max() <= limit
    clamped = true >= 15.9
    assert clamped.any() and (~clamped).any()  # both kinds present
    assert (targets[clamped] == limit).all()
    torch.testing.assert_close(targets[~clamped].double(), true[~clamped], rtol=1e-6, atol=1e-5)
    assert seen["label"].max() <= limit  # negatives' benign targets too


# ------------------------------------------------------------ 2. anchors in padding
def test_masked_atss_equals_atss_on_the_image_own_anchors():
    """ATSS with a validity mask on a batch-wide anchor grid gives, for a small image,
    exactly the paper-formula assignment (tests.utils.atss.atss_reference) computed on the anchors
    of its own padded size only; masked anchors are never positive."""
    g = torch.Generator().manual_seed(11)
    big_levels, small_levels = make_anchors((160, 224), STRIDES), make_anchors((64, 96), STRIDES)
    big_shapes = [(math.ceil(160 / s), math.ceil(224 / s)) for s in STRIDES]
    small_shapes = [(math.ceil(64 / s), math.ceil(96 / s)) for s in STRIDES]
    idx = sub_grid_index(small_shapes, big_shapes)
    anchors = torch.cat(big_levels)
    A = len(anchors)
    gts = random_boxes(g, 6, 60, 90)
    gts[0] = torch.tensor([70.0, 30.0, 90.0, 60.0])  # at the small image's border
    valid = torch.zeros(1, A, dtype=torch.bool)
    valid[0, idx] = True
    matched, pos = atss_assign(
        anchors,
        [len(lvl) for lvl in big_levels],
        gts[None],
        torch.ones(1, len(gts), dtype=torch.bool),
        9,
        anchor_valid=valid,
    )
    want_matched, want_pos = atss_reference(small_levels, gts.tolist())
    want_pos = torch.tensor(want_pos)
    assert want_pos.sum() > 0
    assert torch.equal(pos[0, idx], want_pos)
    assert torch.equal(matched[0, idx][want_pos], torch.tensor(want_matched)[want_pos])
    assert not pos[0][~valid[0]].any()


def test_anchors_in_another_images_padding_are_not_candidates_and_add_no_qfl(model, monkeypatch):
    """A batch of a small (60 x 90, padded to 64 x 96) and a large (160 x 224) image. The
    small image's predictions in the batch are its predictions alone, placed top-left, with
    confident garbage in the batch padding. Then, as in the reference:

    * the small image's assignment equals its assignment alone (the batch padding holds no
      ATSS candidate: the candidate set, hence the IoU threshold, does not change), and
      no anchor outside its own padded size is positive;
    * QFL is additive over the images: loss x normalizer of the batch equals the sum of
      loss x normalizer of each image alone (both images have positives, so the
      normalizer is the number of positives under either normalizer rule); the garbage
      scores in the padding add nothing.
    """
    g = torch.Generator().manual_seed(12)
    small, large = (60, 90), (160, 224)
    small_shapes, large_shapes = level_shapes(*small), level_shapes(*large)
    gts_small = instances(
        small,
        torch.cat([random_boxes(g, 4, *small), torch.tensor([[66.0, 20.0, 90.0, 60.0]])]),
        [0, 1, 2, 0, 1],
    )
    gts_large = instances(large, random_boxes(g, 5, *large), [2, 1, 0, 1, 2])
    pred_small = random_maps(g, model, small_shapes)
    pred_large = random_maps(g, model, large_shapes)
    batch_pred = stack(embed(pred_small, large_shapes, g), pred_large)

    loss_b, lab_b = run_training(
        model, [small, large], batch_pred, [gts_small, gts_large], monkeypatch
    )
    loss_s, lab_s = run_training(model, [small], pred_small, [gts_small], monkeypatch)
    loss_l, lab_l = run_training(model, [large], pred_large, [gts_large], monkeypatch)
    matched_b, pos_b = lab_b[4], lab_b[5]
    idx = sub_grid_index(small_shapes, large_shapes)
    outside = torch.ones(pos_b.shape[1], dtype=torch.bool)
    outside[idx] = False

    valid_b = lab_b[6]  # (2, A): the rule of MMDetection's valid_flags with pad_shape (64, 96)
    assert lab_s[6] is None and lab_l[6] is None  # alone, every anchor is valid
    assert valid_b[0, idx].all() and not valid_b[0, outside].any() and valid_b[1].all()
    n_s, n_l = int(lab_s[5].sum()), int(lab_l[5].sum())
    assert n_s > 0 and n_l > 0
    assert not pos_b[0, outside].any()
    assert torch.equal(pos_b[0, idx], lab_s[5][0])
    assert torch.equal(matched_b[0, idx][lab_s[5][0]], lab_s[4][0][lab_s[5][0]])
    assert torch.equal(pos_b[1], lab_l[5][0]) and torch.equal(matched_b[1], lab_l[4][0])

    qfl_sum = loss_b["loss_qfl"].double() * (n_s + n_l)
    want = loss_s["loss_qfl"].double() * n_s + loss_l["loss_qfl"].double() * n_l
    torch.testing.assert_close(qfl_sum, want, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------- 7. QFL normalizer
def test_qfl_normalizer_sums_max_positives_1_over_images(model, monkeypatch):
    """One image with positives and one without: the reference divides the QFL sum by
    n + 1 (each image adds max(n_i, 1)), not by max(n, 1): the loss is n / (n + 1) of what a
    clamp-at-1 total would give. Checked against the two images alone (their QFL sums are
    loss x n and loss x 1), and the empty image's loss against the QFL formula itself."""
    g = torch.Generator().manual_seed(13)
    size = (96, 128)
    shapes = level_shapes(*size)
    gts_a = instances(size, random_boxes(g, 4, *size), [0, 1, 2, 1])
    gts_e = instances(size, torch.zeros(0, 4), torch.zeros(0))
    pred_a, pred_e = random_maps(g, model, shapes), random_maps(g, model, shapes)

    loss_b, lab_b = run_training(
        model, [size, size], stack(pred_a, pred_e), [gts_a, gts_e], monkeypatch
    )
    loss_a, lab_a = run_training(model, [size], pred_a, [gts_a], monkeypatch)
    loss_e, lab_e = run_training(model, [size], pred_e, [gts_e], monkeypatch)
    n = int(lab_b[5].sum())
    assert n == int(lab_a[5].sum()) > 0 and not lab_e[5].any()

    # The empty image: every anchor is a negative, QFL = sum over classes of -p^2 log(1 - p).
    cls, _, quality = pred_e
    p = torch.cat(
        [(c.double().sigmoid() * q.double().sigmoid()).flatten(2) for c, q in zip(cls, quality)], 2
    )
    torch.testing.assert_close(
        loss_e["loss_qfl"].double(), (-(p**2) * torch.log1p(-p)).sum(), rtol=1e-5, atol=1e-6
    )

    want = (loss_a["loss_qfl"].double() * n + loss_e["loss_qfl"].double()) / (n + 1)
    torch.testing.assert_close(loss_b["loss_qfl"].double(), want, rtol=1e-5, atol=1e-7)
    clamp_rule = (loss_a["loss_qfl"].double() * n + loss_e["loss_qfl"].double()) / n
    assert loss_b["loss_qfl"].item() / clamp_rule.item() == pytest.approx(n / (n + 1), rel=1e-5)
