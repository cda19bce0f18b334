"""The GFocalV2 meta-architecture: construction, parameter count, training edge cases,
inference semantics, GFLV1, config errors and mixed precision."""

import pytest
import torch
import torchvision

from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import META_ARCH_REGISTRY, build_model

from gfocalv2.modeling import GFocalV2
from tests.utils.models import gfocal_cfg, instances, random_input


def test_registered():
    assert META_ARCH_REGISTRY.get("GFocalV2") is GFocalV2


def reference_gflv2_r50_parameter_count(num_classes=80, reg_max=16, fpn=256):
    """Counted from the architecture description alone (torchvision ResNet-50 without fc,
    FPN on C3-C5 with P6/P7 convs, GN towers with bias-free convs, DGQP 20->64->1)."""
    conv = lambda cin, cout, k, bias: cin * cout * k * k + (cout if bias else 0)
    bn = lambda c: 2 * c
    total = conv(3, 64, 7, False) + bn(64)
    cin = 64
    for blocks, mid in ((3, 64), (4, 128), (6, 256), (3, 512)):
        out = mid * 4
        for b in range(blocks):
            total += conv(cin, mid, 1, False) + bn(mid) + conv(mid, mid, 3, False) + bn(mid)
            total += conv(mid, out, 1, False) + bn(out)
            if b == 0:
                total += conv(cin, out, 1, False) + bn(out)
            cin = out
    assert total == 23_508_032  # torchvision resnet50 (25,557,032) minus its fc (2,049,000)
    total += sum(conv(c, fpn, 1, True) for c in (512, 1024, 2048)) + 3 * conv(fpn, fpn, 3, True)
    total += 2 * conv(fpn, fpn, 3, True)  # P6, P7
    total += 2 * 4 * (conv(fpn, fpn, 3, False) + 2 * fpn)  # towers: conv + GN affine
    total += conv(fpn, num_classes, 3, True) + conv(fpn, 4 * (reg_max + 1), 3, True)
    total += 5  # per-level scales
    total += conv(4 * (4 + 1), 64, 1, True) + conv(64, 1, 1, True)  # DGQP
    return total


def count_parameters(model):
    """Parameters plus the affine tensors of frozen BN layers (buffers in Detectron2)."""
    n = sum(p.numel() for p in model.parameters())
    n += sum(
        m.weight.numel() + m.bias.numel()
        for m in model.modules()
        if isinstance(m, FrozenBatchNorm2d)
    )
    return n


def test_parameter_count_equals_reference_architecture():
    model = build_model(gfocal_cfg())
    assert count_parameters(model) == reference_gflv2_r50_parameter_count()
    v1 = build_model(gfocal_cfg("MODEL.GFOCAL.DGQP_ENABLED", False))
    assert count_parameters(model) - count_parameters(v1) == 20 * 64 + 64 + 64 + 1


def test_p6_p7_from_p5_output_without_relu():
    model = build_model(
        gfocal_cfg("MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64)
    )
    fpn = model.backbone
    assert fpn.top_block.in_feature == "p5" and fpn.top_block.p6.in_channels == 256
    x = torch.randn(1, 256, 8, 8)
    p6, p7 = fpn.top_block(x)
    torch.testing.assert_close(
        p7, fpn.top_block.p7(fpn.top_block.p6(x))
    )  # no activation in between
    shapes = fpn.output_shape()
    assert [shapes[f"p{i}"].stride for i in range(3, 8)] == [8, 16, 32, 64, 128]


def test_head_initialization():
    model = build_model(gfocal_cfg())
    head = model.head
    bias = head.cls_score.bias.detach()
    torch.testing.assert_close(bias, torch.full_like(bias, -torch.log(torch.tensor(99.0)).item()))
    assert head.cls_subnet[0].bias is None and isinstance(head.cls_subnet[1], torch.nn.GroupNorm)
    assert abs(head.bbox_pred.weight.std().item() - 0.01) < 1e-3
    assert all(s.scale.item() == 1.0 for s in head.scales)
    assert head.dgqp[0].in_channels == 20 and head.dgqp[2].out_channels == 1


@pytest.mark.parametrize("empty", ["some", "all"])
def test_training_with_images_without_annotations(empty):
    g = torch.Generator().manual_seed(0)
    model = build_model(gfocal_cfg(tiny=True))
    model.train()
    batch = [random_input(g, 96, 128, 4, 3), random_input(g, 96, 96, 2, 3)]
    batch[1]["instances"] = instances((96, 96), torch.zeros(0, 4), torch.zeros(0))
    if empty == "all":
        batch[0]["instances"] = instances((96, 128), torch.zeros(0, 4), torch.zeros(0))
    losses = model(batch)
    assert set(losses) == {"loss_qfl", "loss_giou", "loss_dfl"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if empty == "all":
        assert losses["loss_giou"].item() == 0.0 and losses["loss_dfl"].item() == 0.0
        assert losses["loss_qfl"].item() > 0.0  # negatives still learn
    else:
        assert losses["loss_giou"].item() > 0.0


def test_dgqp_gradient_reaches_regression_branch():
    g = torch.Generator().manual_seed(1)
    model = build_model(
        gfocal_cfg("MODEL.GFOCAL.GIOU_WEIGHT", 0.0, "MODEL.GFOCAL.DFL_WEIGHT", 0.0, tiny=True)
    )
    model.train()
    losses = model([random_input(g, 64, 64, 3, 3)])
    losses["loss_qfl"].backward()  # only QFL: reaches bbox_pred through the DGQP alone
    assert model.head.bbox_pred.weight.grad.abs().sum() > 0


def test_losses_in_float32_under_autocast():
    g = torch.Generator().manual_seed(2)
    model = build_model(gfocal_cfg(tiny=True))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model([random_input(g, 64, 96, 3, 3)])
    for v in losses.values():
        assert v.dtype == torch.float32 and torch.isfinite(v)


def confident_model(*opts):
    """A model whose every location scores sigmoid(10) x sigmoid(10) for every class."""
    model = build_model(gfocal_cfg(*opts, tiny=True))
    model.eval()
    with torch.no_grad():
        model.head.cls_score.bias.fill_(10.0)
        model.head.cls_score.weight.zero_()
        model.head.dgqp[2].bias.fill_(10.0)
        model.head.dgqp[2].weight.zero_()
    return model


def test_inference_output_in_input_image_coordinates():
    model = confident_model("MODEL.GFOCAL.DETECTIONS_PER_IMAGE", 20)
    image = torch.rand(3, 64, 96) * 255
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 128, "width": 192}])
    inst = out["instances"]
    assert inst.image_size == (128, 192)
    assert set(inst.get_fields()) == {"pred_boxes", "scores", "pred_classes"}
    assert len(inst) == 20  # DETECTIONS_PER_IMAGE (more than 20 survive NMS at this size)
    b = inst.pred_boxes.tensor
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= 192).all() and (b[:, 3] <= 128).all()
    assert (inst.scores[:-1] >= inst.scores[1:]).all()  # sorted
    assert inst.pred_classes.max() < 3


def test_inference_single_image_semantics():
    """Score threshold (strict), per-level top-k by max class score, class-wise NMS, max
    detections."""
    model = confident_model(
        "MODEL.GFOCAL.TOPK_CANDIDATES_TEST", 2, "MODEL.GFOCAL.DETECTIONS_PER_IMAGE", 3
    )
    reg_max = model.reg_max
    centers = [
        torch.tensor([[10.0, 10.0], [50.0, 50.0], [90.0, 10.0]]),
        torch.tensor([[10.0, 10.0]]),
    ]
    strides = [torch.full((3,), 8.0), torch.full((1,), 16.0)]
    scores = [
        torch.tensor(
            [[0.9, 0.05, 0.0], [0.8, 0.7, 0.0], [0.06, 0.0, 0.0]]
        ),  # loc 2 loses the level top-2
        torch.tensor([[0.85, 0.0, 0.3]]),
    ]
    # Every side distance: all mass on bin 1 -> 1 x stride.
    logits = torch.full((4, reg_max + 1), -50.0)
    logits[:, 1] = 50.0
    box_logits = [logits.reshape(1, -1).repeat(3, 1), logits.reshape(1, -1).repeat(1, 1)]
    inst = model.inference_single_image(centers, strides, scores, box_logits, (100, 100))
    # Candidates above 0.05: (l0,c0).9 (l1,c0).8 (l1,c1).7 (p1 l0,c0).85 (p1 l0,c2).3; 0.05
    # itself is not kept.
    # Class-0 NMS: level-1 box [-6,-6,26,26] clipped to [0,0,26,26] overlaps [2,2,18,18] with IoU
    # 256/676 < 0.6: kept.
    assert len(inst) == 3
    torch.testing.assert_close(inst.scores, torch.tensor([0.9, 0.85, 0.8]))
    torch.testing.assert_close(inst.pred_classes, torch.tensor([0, 0, 0]))
    torch.testing.assert_close(inst.pred_boxes.tensor[0], torch.tensor([2.0, 2.0, 18.0, 18.0]))
    torch.testing.assert_close(inst.pred_boxes.tensor[1], torch.tensor([0.0, 0.0, 26.0, 26.0]))


def test_nms_suppresses_same_class_overlaps_only():
    model = confident_model("MODEL.GFOCAL.TOPK_CANDIDATES_TEST", 10)
    reg_max = model.reg_max
    centers = [torch.tensor([[40.0, 40.0], [41.0, 40.0]])]
    strides = [torch.full((2,), 8.0)]
    logits = torch.full((4, reg_max + 1), -50.0)
    logits[:, 2] = 50.0
    box_logits = [logits.reshape(1, -1).repeat(2, 1)]
    scores = [torch.tensor([[0.9, 0.0, 0.0], [0.8, 0.7, 0.0]])]
    inst = model.inference_single_image(centers, strides, scores, box_logits, (100, 100))
    # (loc1, c0) is suppressed by (loc0, c0) (IoU ~0.94); (loc1, c1) survives in its own class.
    assert sorted(zip(inst.pred_classes.tolist(), inst.scores.tolist())) == [
        (0, pytest.approx(0.9)),
        (1, pytest.approx(0.7)),
    ]


def test_gflv1_by_configuration():
    g = torch.Generator().manual_seed(3)
    model = build_model(gfocal_cfg("MODEL.GFOCAL.DGQP_ENABLED", False, tiny=True))
    assert model.head.dgqp is None and not any("dgqp" in k for k in model.state_dict())
    model.train()
    losses = model([random_input(g, 64, 64, 2, 3)])
    assert set(losses) == {"loss_qfl", "loss_giou", "loss_dfl"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())


def gflv1_reference_detections(model, cls_logits, box_logits, image_size):
    """GFL (V1) inference computed here from the head's outputs alone, as the paper and the
    reference define it: score = sigmoid(class logit) (no quality factor), side distances =
    expectation of softmax over the bins 0..reg_max times the level's stride, measured from
    the location (x * stride, y * stride), clipped to the image; class-wise NMS (torchvision's
    own), best ``max_detections_per_image``. Every location of these small maps is a candidate
    (fewer than TOPK_CANDIDATES_TEST per level)."""
    R, C = model.reg_max, model.num_classes
    boxes, scores = [], []
    for stride, cls, box in zip(model.anchor_generator.strides, cls_logits, box_logits):
        _, _, H, W = cls.shape
        assert H * W <= model.test_topk_candidates
        ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        centers = torch.stack([xs, ys], -1).reshape(-1, 2).float() * stride
        prob = box[0].reshape(4, R + 1, H * W).permute(2, 0, 1).softmax(-1)  # (HW, 4, R+1)
        dist = (prob * torch.arange(R + 1.0)).sum(-1) * stride  # (HW, 4): l, t, r, b
        b = torch.cat([centers - dist[:, :2], centers + dist[:, 2:]], 1)
        h, w = image_size
        boxes.append(torch.minimum(b.clamp(min=0), torch.tensor([w, h, w, h], dtype=b.dtype)))
        scores.append(cls[0].reshape(C, H * W).t().sigmoid())
    boxes, scores = torch.cat(boxes), torch.cat(scores)
    loc, cls = (scores > model.test_score_thresh).nonzero(as_tuple=True)
    keep = torchvision.ops.batched_nms(boxes[loc], scores[loc, cls], cls, model.test_nms_thresh)
    keep = keep[: model.max_detections_per_image]
    return boxes[loc][keep], scores[loc, cls][keep], cls[keep]


def test_gflv1_inference_is_sigmoid_class_scores_and_decoded_distributions():
    """GFL (V1)'s detections are those computed independently from its head's outputs (above):
    scores are the class sigmoids with no quality factor, boxes the decoded distributions."""
    torch.manual_seed(0)
    model = build_model(
        gfocal_cfg("MODEL.GFOCAL.DGQP_ENABLED", False, "MODEL.PIXEL_STD", [50.0] * 3, tiny=True)
    ).eval()
    with torch.no_grad():  # scores and boxes that vary over locations and classes
        model.head.cls_score.weight.normal_(0.0, 0.05)
        model.head.cls_score.bias.fill_(-1.5)
        model.head.bbox_pred.weight.normal_(0.0, 0.05)
    outputs = []
    handle = model.head.register_forward_hook(lambda m, i, out: outputs.append(out))
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(4)) * 255
    with torch.no_grad():
        got = model([{"image": image}])[0]["instances"]
    handle.remove()
    cls_logits, box_logits, quality_logits = outputs[0]
    assert quality_logits == []  # no DGQP output at all
    boxes, scores, classes = gflv1_reference_detections(model, cls_logits, box_logits, (96, 128))
    assert 20 <= len(scores) <= model.max_detections_per_image
    assert len(got) == len(scores)
    # Matched one to one (two scores within float32 rounding may come in either order): same
    # class, scores within a few float32 ulps (2^-20 relative; a quality factor would halve
    # them), box corners within float32 rounding of two decodings of <= 128-px coordinates
    # (128 x 2^-20 ~ 1e-4 px).
    free = torch.ones(len(scores), dtype=torch.bool)
    for box, score, c in zip(got.pred_boxes.tensor, got.scores, got.pred_classes):
        close = (
            free
            & (classes == c)
            & ((scores - score).abs() <= 2**-20 * score)
            & ((boxes - box).abs().amax(1) <= 1e-4)
        )
        assert close.any(), (box, score, c)
        free[close.nonzero()[0, 0]] = False


@pytest.mark.parametrize(
    "opts, message",
    [
        (("MODEL.GFOCAL.REG_MAX", 0), "REG_MAX must be >= 1"),
        (("MODEL.GFOCAL.NUM_CLASSES", 0), "NUM_CLASSES must be >= 1"),
        (("MODEL.GFOCAL.DGQP_TOPK", 30), "DGQP_TOPK"),
        (("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[0.5, 1.0, 2.0]]), "one anchor per location"),
        (("MODEL.GFOCAL.IN_FEATURES", ["p3", "p9"]), "p9"),
    ],
)
def test_config_errors_are_clear(opts, message):
    with pytest.raises(ValueError, match=message):
        build_model(gfocal_cfg(*opts, tiny=True))
