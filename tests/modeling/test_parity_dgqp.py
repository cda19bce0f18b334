"""The DGQP (GFLV2's quality branch) piece by piece against the authors' code (issue 24, item 2).

The reference below is written here, in plain torch, from a reading of the authors'
``implus/GFocalV2`` (an MMDetection 2.6 fork), file ``mmdet/models/dense_heads/gfocal_head.py``,
class ``GFocalHead`` (``_init_layers``, ``init_weights``, ``forward_single``, ``loss_single``),
and ``mmdet/models/losses/gfocal_loss.py`` (``quality_focal_loss``). It is not their code: the
statistics are built side by side with ``torch.sort`` and the layers with ``F.conv2d``, and it is
fed our head's weights (authors' parameter names: ``reg_conf.0`` / ``reg_conf.2``).

What the authors do, as read:

- ``bbox_pred = scale(gfl_reg(reg_feat)).float()``: the level's learnable scale is applied
  before the softmax; nothing is detached anywhere in ``forward_single``.
- ``prob`` = softmax of ``bbox_pred`` viewed as (N, 4, reg_max + 1, H, W) over the bins; per side
  the ``reg_topk`` largest probabilities in decreasing order, then (``add_mean``) their mean after
  them; flattened side-major to 4 x (topk [+ 1]) channels (l, t, r, b; e.g. 20 for 4 + mean).
- ``reg_conf`` = Conv2d(4 x (topk [+ 1]), reg_channels, 1), ReLU, Conv2d(reg_channels, 1, 1),
  Sigmoid (parameters at indices 0 and 2); ``init_weights``: ``normal_init(std=0.01)``, bias 0.
- ``cls_score = gfl_cls(cls_feat).sigmoid() * quality_score``: this product is the head's only
  score output, so it is what the QFL receives (``QualityFocalLoss(use_sigmoid=False)``:
  binary cross-entropy on probabilities), what ``weight_targets = cls_score.detach().max(1)``
  weighs GIoU and DFL with, and what inference ranks and thresholds.
- GFL V1 (MMDetection's ``GFLHead``) has no quality branch: the class logits go to the QFL with
  ``use_sigmoid=True``, and inference scores are ``sigmoid(cls)``.

One difference, deliberate and documented (README "The model, in numbers", ``head.py``): the
authors' ``use_sigmoid=False`` gives ``gfl_cls`` a background channel (81 on COCO), trained to 0
like a class that never occurs; its joint score also sends a (vanishing) gradient into the
quality. We have C channels
(:func:`test_authors_background_channel_is_one_more_never_positive_class`).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model

from gfocalv2.modeling import GFocalV2, meta_arch
from gfocalv2.modeling.head import DistributionGuidedQualityPredictor, GFocalHead
from tests.utils.models import gfocal_cfg, instances

# (REG_MAX, DGQP_TOPK, DGQP_ADD_MEAN, DGQP_CHANNELS): the authors' setting first.
SETTINGS = [
    (16, 4, True, 64),
    (16, 4, False, 64),
    (8, 3, True, 32),
    (7, 8, True, 16),  # k = reg_max + 1: every bin
    (16, 1, False, 8),
    (4, 2, True, 5),
]
STRIDES = (8, 16, 32, 64, 128)


# ------------------------------------------------------------------ the reference, from reading


def reference_statistics(bbox_pred, reg_max, topk, add_mean):
    """The DGQP input of ``GFocalHead.forward_single``: (N, 4 (reg_max + 1), H, W) scaled box
    logits -> (N, 4 (topk [+ 1]), H, W), channel order l[top1..topk, mean], t[...], r[...],
    b[...]. Built side by side (``torch.sort``, not ``topk``), so that the channel order is
    spelled out rather than implied by a reshape."""
    bins = reg_max + 1
    channels = []
    for side in range(4):  # l, t, r, b: the order of gfl_reg's output channels
        prob = bbox_pred[:, side * bins : (side + 1) * bins].float().softmax(dim=1)
        largest = prob.sort(dim=1, descending=True).values[:, :topk]  # (N, k, H, W)
        channels.extend(largest.unbind(dim=1))
        if add_mean:
            channels.append(largest.mean(dim=1))  # mean of the top-k, not of all bins
    return torch.stack(channels, dim=1)


def reference_quality(bbox_pred, p, reg_max, topk, add_mean, detach=False):
    """``reg_conf(stat)`` of ``forward_single``: conv1x1, ReLU, conv1x1, Sigmoid -> (N, 1, H, W)
    in (0, 1). ``detach``: a variant the authors do NOT use, to show that the gradient test
    below tells the two apart."""
    stat = reference_statistics(bbox_pred, reg_max, topk, add_mean)
    if detach:
        stat = stat.detach()
    hidden = F.relu(F.conv2d(stat, p["reg_conf.0.weight"], p["reg_conf.0.bias"]))
    return torch.sigmoid(F.conv2d(hidden, p["reg_conf.2.weight"], p["reg_conf.2.bias"]))


def reference_forward_single(x, level, p, cfg, detach=False):
    """``GFocalHead.forward_single`` -> (joint class-quality score, box logits) of one level."""
    cls_feat, reg_feat = x, x
    for i in range(cfg["num_convs"]):  # ConvModule: conv (no bias with a norm), GN(32), ReLU
        cls_feat = F.conv2d(cls_feat, p[f"cls_convs.{i}.conv.weight"], padding=1)
        cls_feat = F.relu(
            F.group_norm(cls_feat, 32, p[f"cls_convs.{i}.gn.weight"], p[f"cls_convs.{i}.gn.bias"])
        )
        reg_feat = F.conv2d(reg_feat, p[f"reg_convs.{i}.conv.weight"], padding=1)
        reg_feat = F.relu(
            F.group_norm(reg_feat, 32, p[f"reg_convs.{i}.gn.weight"], p[f"reg_convs.{i}.gn.bias"])
        )
    bbox_pred = F.conv2d(reg_feat, p["gfl_reg.weight"], p["gfl_reg.bias"], padding=1)
    bbox_pred = (bbox_pred * p[f"scales.{level}.scale"]).float()  # scaled before the softmax
    quality = reference_quality(
        bbox_pred, p, cfg["reg_max"], cfg["topk"], cfg["add_mean"], detach=detach
    )
    cls = F.conv2d(cls_feat, p["gfl_cls.weight"], p["gfl_cls.bias"], padding=1)
    return cls.sigmoid() * quality, bbox_pred


def reference_qfl(pred, label, score, beta=2.0):
    """``quality_focal_loss`` with ``use_sigmoid=False`` (the authors' GFLV2 configs): binary
    cross-entropy on the joint probabilities; every (sample, class) supervised by 0 with the
    factor pred^beta, then each positive's own class replaced by BCE(pred, IoU) |IoU - pred|^beta.
    ``label`` in [0, C], C = background. Returns (N,) sums over classes."""
    loss = F.binary_cross_entropy(pred, torch.zeros_like(pred), reduction="none") * pred.pow(beta)
    pos = (label >= 0) & (label < pred.shape[1])
    idx, cls = pos.nonzero(as_tuple=True)[0], label[pos]
    p = pred[idx, cls]
    pos_loss = F.binary_cross_entropy(p, score[idx], reduction="none") * (score[idx] - p).abs().pow(
        beta
    )
    loss = loss.index_put((idx, cls), pos_loss)
    return loss.sum(dim=1)


def authors_parameters(head):
    """Our head's parameters under the authors' names, as fresh leaves (same values)."""
    p = {}
    n = len([m for m in head.cls_subnet if isinstance(m, torch.nn.Conv2d)])
    for ours, theirs in (("cls_subnet", "cls_convs"), ("bbox_subnet", "reg_convs")):
        tower = getattr(head, ours)
        for i in range(n):
            p[f"{theirs}.{i}.conv.weight"] = tower[3 * i].weight
            p[f"{theirs}.{i}.gn.weight"] = tower[3 * i + 1].weight
            p[f"{theirs}.{i}.gn.bias"] = tower[3 * i + 1].bias
    for ours, theirs in (("cls_score", "gfl_cls"), ("bbox_pred", "gfl_reg")):
        p[f"{theirs}.weight"] = getattr(head, ours).weight
        p[f"{theirs}.bias"] = getattr(head, ours).bias
    for level, s in enumerate(head.scales):
        p[f"scales.{level}.scale"] = s.scale
    if head.dgqp is not None:
        for i in (0, 2):
            p[f"reg_conf.{i}.weight"] = head.dgqp[i].weight
            p[f"reg_conf.{i}.bias"] = head.dgqp[i].bias
    return {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}


# ------------------------------------------------------------------------------------ helpers


def head_cfg(reg_max, topk, add_mean, channels, *opts):
    return gfocal_cfg(
        "MODEL.GFOCAL.REG_MAX",
        reg_max,
        "MODEL.GFOCAL.DGQP_TOPK",
        topk,
        "MODEL.GFOCAL.DGQP_ADD_MEAN",
        add_mean,
        "MODEL.GFOCAL.DGQP_CHANNELS",
        channels,
        "MODEL.GFOCAL.NUM_CLASSES",
        5,
        "MODEL.GFOCAL.NUM_CONVS",
        2,
        *opts,
    )


def randomized_head(cfg, in_channels=32, seed=0):
    """Our head (built from the config keys), weights made large and varied enough that the
    softmax is far from uniform, the ReLU clips, the scales differ from 1 and, on
    :func:`features`, the quality logits have mean 0 and std 2 (qualities across (0, 1))."""
    torch.manual_seed(seed)
    head = GFocalHead(cfg, [ShapeSpec(channels=in_channels, stride=s) for s in STRIDES[:3]])
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, t in head.named_parameters():
            if name.startswith("scales"):
                t.copy_(torch.empty(()).uniform_(0.5, 2.0, generator=g))
            elif name.startswith("bbox_pred"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            elif name.startswith("dgqp"):
                t.copy_(
                    torch.randn(t.shape, generator=g) * (2.0 if name.endswith("weight") else 0.2)
                )
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
        logits = torch.cat([q.flatten() for q in head(features())[2]])
        head.dgqp[2].weight.mul_(2.0 / logits.std())
        head.dgqp[2].bias.sub_(logits.mean() * 2.0 / logits.std())
    return head


def features(seed=1, n=2, channels=32, sizes=((6, 7), (3, 4), (2, 2))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, channels, h, w, generator=g) for h, w in sizes]


def flat(maps):
    """Per-level (N, K, H, W) -> (N * sum H W, K), levels concatenated, each row-major."""
    n, k = maps[0].shape[:2]
    return torch.cat([m.permute(0, 2, 3, 1).reshape(n, -1, k) for m in maps], 1).reshape(-1, k)


def joint_scores(cls, quality):
    """Our meta-architecture's joint score (``GFocalV2.joint_scores``, which reads no state)."""
    return GFocalV2.joint_scores(None, cls, quality)


def head_cfg_dict(reg_max, topk, add_mean, num_convs=2):
    return {"reg_max": reg_max, "topk": topk, "add_mean": add_mean, "num_convs": num_convs}


# -------------------------------------------------------------- (a) the DGQP input statistics


def test_statistics_by_hand_spell_out_the_channel_order():
    """Four sides of 5 bins (reg_max 4), top-2 and mean: the 12 numbers fed to the first 1x1 conv
    are, in this order, l: top1, top2, mean; t: ...; r: ...; b: ... (the authors' layout,
    ``reg_conf.0`` weight column j multiplies number j)."""
    probs = torch.tensor(
        [
            [0.1, 0.5, 0.2, 0.15, 0.05],  # l
            [0.05, 0.05, 0.1, 0.6, 0.2],  # t
            [0.7, 0.1, 0.1, 0.05, 0.05],  # r
            [0.2, 0.2, 0.2, 0.2, 0.2],  # b
        ]
    )
    expected = [0.5, 0.2, 0.35, 0.6, 0.2, 0.4, 0.7, 0.1, 0.4, 0.2, 0.2, 0.2]
    box_logits = probs.log().reshape(1, 20, 1, 1) + 3.0  # softmax-invariant shift
    dgqp = DistributionGuidedQualityPredictor(reg_max=4, topk=2, add_mean=True, channels=8)
    seen = []
    dgqp[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    dgqp(box_logits)
    torch.testing.assert_close(seen[0].reshape(-1), torch.tensor(expected))
    torch.testing.assert_close(
        reference_statistics(box_logits, 4, 2, True).reshape(-1), torch.tensor(expected)
    )


@pytest.mark.parametrize("reg_max, topk, add_mean, channels", SETTINGS)
def test_statistics_equal_the_reference(reg_max, topk, add_mean, channels):
    """The DGQP input, computed by our head from the config keys, equals the authors' statistics
    of the *scaled* box logits, number for number and in the same channel order."""
    head = randomized_head(head_cfg(reg_max, topk, add_mean, channels))
    assert head.dgqp[0].in_channels == 4 * (topk + int(add_mean))
    assert head.dgqp[0].out_channels == channels and head.dgqp[2].in_channels == channels
    seen = []
    head.dgqp[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    feats = features()
    with torch.no_grad():
        _, box_logits, _ = head(feats)
        p = authors_parameters(head)
        cfg = head_cfg_dict(reg_max, topk, add_mean)
        for level, (x, ours, box) in enumerate(zip(feats, seen, box_logits)):
            _, ref_box = reference_forward_single(x, level, p, cfg)
            torch.testing.assert_close(box, ref_box, rtol=1e-5, atol=1e-6)
            ref_stat = reference_statistics(ref_box, reg_max, topk, add_mean)
            torch.testing.assert_close(ours, ref_stat, rtol=1e-6, atol=1e-7)
            # the statistics of the unscaled logits would differ: the scale is before the softmax
            assert p[f"scales.{level}.scale"].item() != 1.0
            unscaled = reference_statistics(
                ref_box / p[f"scales.{level}.scale"], reg_max, topk, add_mean
            )
            assert (unscaled - ours).abs().max() > 1e-3


# ------------------------------------------------------- (b) two 1x1 layers, ReLU and sigmoid


@pytest.mark.parametrize("reg_max, topk, add_mean, channels", SETTINGS)
def test_quality_layers_equal_the_reference(reg_max, topk, add_mean, channels):
    """conv1x1 -> ReLU -> conv1x1 -> sigmoid: our head returns the logit (the sigmoid is applied
    in the joint score), the authors' ``reg_conf`` ends with ``nn.Sigmoid``. Parameters at the
    same indices (``dgqp.0/.2`` = ``reg_conf.0/.2``; index 1 ReLU, the authors' 3 Sigmoid)."""
    head = randomized_head(head_cfg(reg_max, topk, add_mean, channels))
    assert [type(m) for m in head.dgqp] == [torch.nn.Conv2d, torch.nn.ReLU, torch.nn.Conv2d]
    assert {k for k, _ in head.dgqp.named_parameters()} == {
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
    }
    assert head.dgqp[0].kernel_size == head.dgqp[2].kernel_size == (1, 1)
    feats = features()
    with torch.no_grad():
        _, box_logits, quality_logits = head(feats)
        p = authors_parameters(head)
        clipped = 0
        for box, q in zip(box_logits, quality_logits):
            ref = reference_quality(box, p, reg_max, topk, add_mean)
            torch.testing.assert_close(q.sigmoid(), ref, rtol=1e-5, atol=1e-6)
            hidden = F.conv2d(
                reference_statistics(box, reg_max, topk, add_mean),
                p["reg_conf.0.weight"],
                p["reg_conf.0.bias"],
            )
            clipped += int((hidden < 0).sum())
        assert clipped > 0  # the ReLU is exercised
        q = torch.cat([x.sigmoid().flatten() for x in quality_logits])
        assert q.max() - q.min() > 0.5  # qualities across the range, not saturated


# ------------------------------------------- (c) the product with sigmoid(cls): train and test


def tiny_model(*opts, seed=0):
    torch.manual_seed(seed)
    model = build_model(gfocal_cfg(*opts, tiny=True))
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        model.head.cls_score.weight.copy_(
            torch.randn(model.head.cls_score.weight.shape, generator=g)
        )
        model.head.cls_score.weight.mul_(0.05)
        model.head.bbox_pred.weight.copy_(
            torch.randn(model.head.bbox_pred.weight.shape, generator=g)
        )
        model.head.bbox_pred.weight.mul_(0.05)
        for s in model.head.scales:
            s.scale.fill_(1.3)
        if model.head.dgqp is not None:
            for m in (model.head.dgqp[0], model.head.dgqp[2]):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
    return model


def batch():
    g = torch.Generator().manual_seed(5)
    boxes = torch.tensor(
        [[8.0, 6.0, 50.0, 40.0], [30.0, 20.0, 90.0, 60.0], [2.0, 30.0, 20.0, 62.0]]
    )
    return [
        {
            "image": torch.rand(3, 64, 96, generator=g) * 255,
            "instances": instances((64, 96), boxes, torch.tensor([0, 2, 1])),
        }
    ]


def capture(model, monkeypatch, inputs):
    """Runs the model; returns the head's outputs and the arguments of the QFL (training) or of
    the per-image candidate selection (inference)."""
    outs, calls = [], []
    model.head.register_forward_hook(lambda m, i, out: outs.append(out))
    qfl, candidates = meta_arch.quality_focal_loss, meta_arch.image_candidates

    def qfl_spy(*args, **kwargs):
        calls.append((args, kwargs))
        return qfl(*args, **kwargs)

    def candidates_spy(*args, **kwargs):
        calls.append((args, kwargs))
        return candidates(*args, **kwargs)

    monkeypatch.setattr(meta_arch, "quality_focal_loss", qfl_spy)
    monkeypatch.setattr(meta_arch, "image_candidates", candidates_spy)
    result = model(inputs)
    return result, outs[0], calls


def test_training_qfl_receives_the_product(monkeypatch):
    """GFLV2 at training: the QFL's input is sigmoid(cls) x sigmoid(DGQP) of the scaled box
    logits (the authors' ``cls_score``, consumed by ``QualityFocalLoss(use_sigmoid=False)``)."""
    model = tiny_model()
    model.train()
    _, (cls, box, quality), calls = capture(model, monkeypatch, batch())
    assert len(calls) == 1
    (pred, label, score, beta), kwargs = calls[0]
    assert not kwargs.get("use_sigmoid", False)  # probabilities, not logits
    p = authors_parameters(model.head)
    R = model.reg_max
    with torch.no_grad():
        ref = [c.sigmoid() * reference_quality(b, p, R, 4, True) for c, b in zip(cls, box)]
    torch.testing.assert_close(pred.detach(), flat(ref), rtol=1e-5, atol=1e-7)
    assert pred.requires_grad  # not detached: the QFL trains the product's both factors
    assert (label < model.num_classes).sum() > 0  # the batch has positives


def test_training_losses_consume_the_product(monkeypatch):
    """loss_qfl is the authors' QFL of the product; each positive's GIoU/DFL weight is the
    product's max over classes, detached (``weight_targets = cls_score.detach().max(dim=1)``)."""
    model = tiny_model("MODEL.GFOCAL.GIOU_WEIGHT", 1.0, "MODEL.GFOCAL.DFL_WEIGHT", 1.0)
    model.train()
    # The GIoU values replaced by a zero leaf v: d loss_giou / dv = weight / sum(weights).
    giou = meta_arch.giou_loss
    probe = []

    def giou_probe(boxes, target_boxes):
        probe.append(torch.zeros(len(boxes), requires_grad=True))
        return giou(boxes, target_boxes) * 0 + probe[0]

    monkeypatch.setattr(meta_arch, "giou_loss", giou_probe)
    losses, (cls, box, _), calls = capture(model, monkeypatch, batch())
    (pred, label, score, beta), _ = calls[0]
    C = model.num_classes
    positive = label < C
    assert positive.sum() > 0
    with torch.no_grad():
        p = authors_parameters(model.head)
        product = flat(
            [
                c.sigmoid() * reference_quality(b, p, model.reg_max, 4, True)
                for c, b in zip(cls, box)
            ]
        )
        num_pos = max(int(positive.sum()), 1)
        ref_qfl = reference_qfl(product, label, score, beta).sum() / num_pos
        weight = torch.where(positive, product.max(dim=1).values, 0.0)
    torch.testing.assert_close(losses["loss_qfl"].detach(), ref_qfl, rtol=1e-5, atol=1e-7)
    (normalized,) = torch.autograd.grad(losses["loss_giou"], probe[0], retain_graph=True)
    torch.testing.assert_close(normalized, weight / weight.sum(), rtol=1e-5, atol=1e-8)
    # Detached: GIoU and DFL send nothing to the class logits or the DGQP, which reach them
    # only through the weights.
    model.zero_grad()
    (losses["loss_giou"] + losses["loss_dfl"]).backward()
    assert model.head.cls_score.weight.grad is None or not model.head.cls_score.weight.grad.any()
    for m in (model.head.dgqp[0], model.head.dgqp[2]):
        assert m.weight.grad is None or not m.weight.grad.any()


def test_inference_ranks_the_product(monkeypatch):
    """GFLV2 at test time: the scores ranked per level (top-k) and thresholded are the product."""
    model = tiny_model()
    model.eval()
    with torch.no_grad():
        _, (cls, box, quality), calls = capture(
            model, monkeypatch, [{"image": batch()[0]["image"]}]
        )
        p = authors_parameters(model.head)
        (centers, strides, scores, box_logits, *_), _ = calls[0]
        for c, b, s in zip(cls, box, scores):
            ref = c.sigmoid() * reference_quality(b, p, model.reg_max, 4, True)
            torch.testing.assert_close(s, flat([ref]), rtol=1e-5, atol=1e-7)
            assert s.max() < c.sigmoid().max()  # a quality factor below 1 is applied


def test_gflv1_has_no_product(monkeypatch):
    """GFL V1: the QFL gets the class logits with sigmoid inside (MMDetection's ``GFLHead``,
    ``use_sigmoid=True``), and inference scores are sigmoid(cls), no quality factor."""
    model = tiny_model("MODEL.GFOCAL.DGQP_ENABLED", False)
    assert model.head.dgqp is None
    model.train()
    _, (cls, box, quality), calls = capture(model, monkeypatch, batch())
    assert quality == []
    (pred, *_), kwargs = calls[0]
    assert kwargs.get("use_sigmoid") is True
    torch.testing.assert_close(pred.detach(), flat(cls).detach(), rtol=0, atol=0)
    monkeypatch.undo()
    model.eval()
    with torch.no_grad():
        _, (cls, _, _), calls = capture(model, monkeypatch, [{"image": batch()[0]["image"]}])
    (_, _, scores, *_), _ = calls[0]
    for c, s in zip(cls, scores):
        torch.testing.assert_close(s, flat([c.sigmoid()]), rtol=0, atol=0)


# ------------------------------------------------------------------------------- (d) gradients


def random_targets(n, num_classes, seed=3):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, num_classes + 1, (n,), generator=g)  # C = background
    label[torch.rand(n, generator=g) < 0.6] = num_classes
    score = torch.rand(n, generator=g)
    weight = torch.rand(n, generator=g) + 0.5
    return label, score, weight


@pytest.mark.parametrize("reg_max, topk, add_mean, channels", SETTINGS[:3])
def test_gradients_through_the_head_equal_the_reference(reg_max, topk, add_mean, channels):
    """A loss on the joint score alone (the authors' QFL): its gradients at every head parameter,
    at the box logits (the distribution, through the DGQP only), at the class logits and at the
    input features equal those of the reference's autograd. The box-logit gradient is that of an
    undetached DGQP input; a detached one (which the authors do not have) would differ."""
    head = randomized_head(head_cfg(reg_max, topk, add_mean, channels))
    cfg = head_cfg_dict(reg_max, topk, add_mean)
    feats = [f.requires_grad_(True) for f in features()]
    ref_feats = [f.detach().clone().requires_grad_(True) for f in feats]

    cls, box, quality = head(feats)
    for t in (*cls, *box):
        t.retain_grad()
    ours = flat(
        [
            joint_scores(c.permute(0, 2, 3, 1), q.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            for c, q in zip(cls, quality)
        ]
    )
    label, score, weight = random_targets(ours.shape[0], head.num_classes)
    (reference_qfl(ours, label, score) * weight).sum().backward()

    def reference_run(detach):
        p = authors_parameters(head)
        xs = [f.detach().clone().requires_grad_(True) for f in ref_feats]
        outs = [reference_forward_single(x, lvl, p, cfg, detach) for lvl, x in enumerate(xs)]
        for _, b in outs:
            b.retain_grad()
        product = flat([joint for joint, _ in outs])
        (reference_qfl(product, label, score) * weight).sum().backward()
        return p, xs, [b for _, b in outs], product

    p, xs, ref_box, product = reference_run(detach=False)
    torch.testing.assert_close(ours.detach(), product.detach(), rtol=1e-5, atol=1e-7)

    names = {
        "reg_conf.0.weight": head.dgqp[0].weight,
        "reg_conf.0.bias": head.dgqp[0].bias,
        "reg_conf.2.weight": head.dgqp[2].weight,
        "reg_conf.2.bias": head.dgqp[2].bias,
        "gfl_reg.weight": head.bbox_pred.weight,
        "gfl_reg.bias": head.bbox_pred.bias,
        "gfl_cls.weight": head.cls_score.weight,
        "gfl_cls.bias": head.cls_score.bias,
        "reg_convs.0.conv.weight": head.bbox_subnet[0].weight,
        "reg_convs.1.gn.weight": head.bbox_subnet[4].weight,
        "cls_convs.0.conv.weight": head.cls_subnet[0].weight,
        **{f"scales.{i}.scale": s.scale for i, s in enumerate(head.scales)},
    }
    for name, param in names.items():
        scale = p[name].grad.abs().max().item()
        assert scale > 0, name  # every one of these receives a gradient from the joint score
        torch.testing.assert_close(param.grad, p[name].grad, rtol=1e-4, atol=1e-5 * scale)
    for ours_x, ref_x in zip(feats, xs):
        scale = ref_x.grad.abs().max().item()
        torch.testing.assert_close(ours_x.grad, ref_x.grad, rtol=1e-4, atol=1e-5 * scale)
    box_grad = torch.cat([b.grad.flatten() for b in box])
    ref_box_grad = torch.cat([b.grad.flatten() for b in ref_box])
    scale = ref_box_grad.abs().max().item()
    assert scale > 0  # the distribution learns from the quality branch
    torch.testing.assert_close(box_grad, ref_box_grad, rtol=1e-4, atol=1e-5 * scale)

    # Sensitivity: with the DGQP input detached, the distribution would get no gradient at all
    # from this loss (the box logits reach it only through the DGQP).
    _, _, detached_box, _ = reference_run(detach=True)
    assert all(b.grad is None or not b.grad.any() for b in detached_box)


def test_meta_arch_qfl_gradients_equal_the_reference():
    """Through our ``GFocalV2.losses`` on fixed per-level head outputs (leaves): the gradients of
    loss_qfl at the class logits, the box logits and the DGQP parameters equal the reference's
    (authors' QFL on sigmoid(cls) x reg_conf(stat), targets from our ATSS labelling), and
    loss_giou + loss_dfl send nothing to the class logits or the DGQP (detached weights)."""
    model = tiny_model("MODEL.GFOCAL.GIOU_WEIGHT", 2.0, "MODEL.GFOCAL.DFL_WEIGHT", 0.25)
    model.train()
    C, R = model.num_classes, model.reg_max
    H, W = 64, 96
    shapes = [(math.ceil(H / s), math.ceil(W / s)) for s in STRIDES]
    g = torch.Generator().manual_seed(11)
    cls = [(torch.randn(1, C, h, w, generator=g) - 1.0).requires_grad_(True) for h, w in shapes]
    box = [
        (torch.randn(1, 4 * (R + 1), h, w, generator=g) * 2).requires_grad_(True) for h, w in shapes
    ]
    gt = batch()[0]["instances"]
    dummy = [torch.zeros(1, 1, h, w) for h, w in shapes]
    anchors, strides, gt_boxes, gt_classes, matched, is_pos, valid = model.label_anchors(
        dummy, [gt], [(H, W)]
    )
    assert is_pos.sum() > 0
    captured = []
    qfl = meta_arch.quality_focal_loss

    def spy(*args, **kwargs):
        captured.append(args)
        return qfl(*args, **kwargs)

    quality = [model.head.dgqp(b) for b in box]
    flat_predictions = model._flatten((cls, box, quality))
    try:
        meta_arch.quality_focal_loss = spy
        losses = model.losses(
            anchors, strides, flat_predictions, gt_boxes, gt_classes, matched, is_pos, valid
        )
    finally:
        meta_arch.quality_focal_loss = qfl
    _, label, score, beta = captured[0]
    grads = torch.autograd.grad(
        losses["loss_qfl"],
        [*cls, *box, model.head.dgqp[0].weight, model.head.dgqp[2].weight],
        retain_graph=True,
    )

    p = authors_parameters(model.head)
    ref_cls = [c.detach().clone().requires_grad_(True) for c in cls]
    ref_box = [b.detach().clone().requires_grad_(True) for b in box]
    product = flat(
        [c.sigmoid() * reference_quality(b, p, R, 4, True) for c, b in zip(ref_cls, ref_box)]
    )
    num_pos = max(int((label < C).sum()), 1)
    ref_loss = reference_qfl(product, label, score.detach(), beta).sum() / num_pos
    torch.testing.assert_close(losses["loss_qfl"].detach(), ref_loss.detach(), rtol=1e-5, atol=0)
    ref_grads = torch.autograd.grad(
        ref_loss, [*ref_cls, *ref_box, p["reg_conf.0.weight"], p["reg_conf.2.weight"]]
    )
    for ours, ref in zip(grads, ref_grads):
        scale = ref.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * scale)

    others = torch.autograd.grad(
        losses["loss_giou"] + losses["loss_dfl"],
        [*cls, model.head.dgqp[0].weight],
        allow_unused=True,
    )
    assert all(t is None or not t.any() for t in others)


# --------------------------------------------------------------------------- (e) initialization


def test_dgqp_initialization_is_normal_std_0_01_bias_0():
    """``normal_init(m, std=0.01)`` for both ``reg_conf`` convs: N(0, 0.01^2) weights, bias 0.
    Pooled over seeds; every check allows 5 standard errors of its estimate at that sample size
    (PyTorch's default conv init, kaiming uniform: std 1 / sqrt(3 fan_in), about 0.13 for the
    first layer and 0.07 for the second, fails them)."""
    w0, w2 = [], []
    for seed in range(10):
        torch.manual_seed(seed)
        head = GFocalHead(gfocal_cfg(), [ShapeSpec(channels=32, stride=s) for s in STRIDES])
        assert head.dgqp[0].weight.shape == (64, 20, 1, 1) and head.dgqp[2].weight.shape == (
            1,
            64,
            1,
            1,
        )
        for i in (0, 2):
            assert torch.equal(head.dgqp[i].bias, torch.zeros_like(head.dgqp[i].bias))
        w0.append(head.dgqp[0].weight.detach().flatten())
        w2.append(head.dgqp[2].weight.detach().flatten())
    sigma = 0.01
    for w in (torch.cat(w0), torch.cat(w2)):
        n = w.numel()
        assert abs(w.mean().item()) < 5 * sigma / math.sqrt(n)
        # std of a normal sample's standard deviation: sigma / sqrt(2 (n - 1))
        assert abs(w.std().item() - sigma) < 5 * sigma / math.sqrt(2 * (n - 1))
        # normal, not uniform with that std: P(|w| < sigma) = 0.6827 (uniform: 0.577)
        inside = (w.abs() < sigma).float().mean().item()
        assert abs(inside - 0.6827) < 5 * math.sqrt(0.6827 * 0.3173 / n)
    assert torch.cat(w2).numel() == 640 and torch.cat(w0).numel() == 12800


# ------------------------------------------------------ the converter: reg_conf.0/.2 -> dgqp.0/.2


def test_converted_reg_conf_weights_line_up_with_the_statistics():
    """``bbox_head.reg_conf.{0,2}`` of an authors' checkpoint are copied unchanged to
    ``head.dgqp.{0,2}``; with column-distinct weights (a permuted channel order would change the
    output), our DGQP then computes the reference's quality from the same box logits."""
    from gfocalv2.convert.mmdet import convert_mmdet
    from tests.tools.test_convert import mmdet_detector, mmdet_resnet_backbone

    sd = mmdet_detector(mmdet_resnet_backbone(50, dcn=(False,) * 4))["state_dict"]
    g = torch.Generator().manual_seed(2)
    # column j of the first layer: weights growing with j, so that no permutation is harmless
    sd["bbox_head.reg_conf.0.weight"] = (
        torch.randn(64, 20, 1, 1, generator=g) + torch.arange(20.0).reshape(1, 20, 1, 1)
    ) * 0.5
    out, report = convert_mmdet(sd, num_classes=80)
    assert not report.unmatched
    for i in (0, 2):
        for kind in ("weight", "bias"):
            assert torch.equal(out[f"head.dgqp.{i}.{kind}"], sd[f"bbox_head.reg_conf.{i}.{kind}"])
    dgqp = DistributionGuidedQualityPredictor(reg_max=16, topk=4, add_mean=True, channels=64)
    dgqp.load_state_dict({k[len("head.dgqp.") :]: v for k, v in out.items() if "dgqp" in k})
    box = torch.randn(2, 68, 5, 6, generator=g) * 3
    theirs = {k[len("bbox_head.") :]: v for k, v in sd.items() if "reg_conf" in k}
    with torch.no_grad():
        ref = reference_quality(box, theirs, 16, 4, True)
        torch.testing.assert_close(dgqp(box).sigmoid(), ref, rtol=1e-5, atol=1e-6)
        # the same weights fed the statistics side-reversed (b, r, t, l) would not match
        flipped = box.reshape(2, 4, 17, 5, 6).flip(1).reshape(2, 68, 5, 6)
        assert (reference_quality(flipped, theirs, 16, 4, True) - ref).abs().max() > 1e-3


# ---------------------------------------------------------- the difference, written down


def test_authors_background_channel_is_one_more_never_positive_class():
    """The authors' ``QualityFocalLoss(use_sigmoid=False)`` gives ``gfl_cls`` C + 1 channels and
    ``quality_focal_loss`` takes every label < C + 1 as a positive, so the background label C of a
    negative supervises channel C with target 0: the same term as any class the anchor is not.
    Their QFL is therefore ours on the first C channels plus that of a class that never occurs;
    the extra term's gradient reaches the quality too, by the share sigmoid(cls_C) of the
    negatives' (about 1/(C+1) at init, vanishing as that channel's bias falls). We keep C
    channels (the converter drops the background one): see README "The model, in numbers"."""
    g = torch.Generator().manual_seed(4)
    C, n = 5, 400
    cls = torch.randn(n, C + 1, generator=g) - 4.6  # the prior-prob bias, as at init
    quality = torch.rand(n, 1, generator=g).requires_grad_(True)
    label, score, _ = random_targets(n, C)
    score = torch.where(label == C, 0.0, score)  # the authors' ``score``: 0 off the positives
    theirs = reference_qfl(cls.sigmoid() * quality, label, score)  # C + 1 channels
    ours = reference_qfl(cls[:, :C].sigmoid() * quality, label, score)
    extra = cls[:, C].sigmoid() * quality[:, 0]
    background = F.binary_cross_entropy(extra, torch.zeros_like(extra), reduction="none") * extra**2
    torch.testing.assert_close(theirs, ours + background)
    # its share of the quality gradient at init, about 1/(C+1) of the negatives' (all classes alike)
    (g_all,) = torch.autograd.grad(theirs[label == C].sum(), quality)
    (g_bg,) = torch.autograd.grad(background[label == C].sum(), quality)
    share = (g_bg.sum() / g_all.sum()).item()
    assert 0.5 / (C + 1) < share < 2.0 / (C + 1)
