"""ResNet / ResNeXt (optionally deformable) and Res2Net v1d bottom-ups: build, forward, parameter
counts, norms."""

import pytest
import torch
import torchvision
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone

from gfocalv2 import add_gfocalv2_config
from gfocalv2.modeling.backbone import (
    DeformBottleneckBlock,
    EvalBatchNorm2d,
    build_gfocal_res2net_backbone,
    build_gfocal_resnet_backbone,
)
from gfocalv2.modeling.backbone.res2net import Bottle2neckBlock

ALL_STAGES = ["res2", "res3", "res4", "res5"]


def make_cfg(
    depth=50, groups=1, width=64, deform=(False,) * 4, modulated=False, norm="FrozenBN", freeze_at=2
):
    cfg = get_cfg()
    add_gfocalv2_config(cfg)
    r = cfg.MODEL.RESNETS
    r.DEPTH, r.NUM_GROUPS, r.WIDTH_PER_GROUP = depth, groups, width
    r.OUT_FEATURES = ALL_STAGES
    r.STRIDE_IN_1X1 = False
    r.NORM = norm
    r.DEFORM_ON_PER_STAGE = list(deform)
    r.DEFORM_MODULATED = modulated
    if depth < 50:
        r.RES2_OUT_CHANNELS = 64
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    return cfg


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def check_forward(model, size=64):
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        out = model(x)
    shapes = model.output_shape()
    assert list(out) == ALL_STAGES
    for name, feat in out.items():
        assert feat.shape == (
            1,
            shapes[name].channels,
            size // shapes[name].stride,
            size // shapes[name].stride,
        ), name
        assert torch.isfinite(feat).all()
    return out


@pytest.mark.parametrize(
    "depth,groups,width,deform,modulated",
    [
        (18, 1, 64, (False,) * 4, False),
        (50, 1, 64, (False, True, True, True), False),
        (50, 1, 64, (False, True, True, True), True),
        (101, 1, 64, (False, True, True, True), False),
        (101, 32, 4, (False, False, True, True), False),
    ],
    ids=["R18", "R50-dcnv1-c3c5", "R50-dcnv2-c3c5", "R101-dcnv1-c3c5", "X101-32x4d-dcnv1-c4c5"],
)
def test_resnet_builds_and_runs(depth, groups, width, deform, modulated):
    model = build_gfocal_resnet_backbone(
        make_cfg(depth, groups, width, deform, modulated), ShapeSpec(channels=3)
    ).eval()
    check_forward(model)
    for idx, stage in enumerate(model.stages):
        for block in stage:
            assert isinstance(block, DeformBottleneckBlock) == deform[idx]
            if deform[idx]:
                assert block.conv2_offset.out_channels == (27 if modulated else 18)
                assert (
                    block.conv2.groups == groups
                    and block.conv2.weight.shape[1] == block.conv2.in_channels // groups
                )
    keys = model.state_dict().keys()
    # Detectron2 names, so Detectron2-style checkpoints load.
    assert "stem.conv1.weight" in keys and "res3.0.shortcut.norm.weight" in keys
    if deform[1]:
        assert "res3.0.conv2_offset.weight" in keys and "res3.0.conv2.norm.running_mean" in keys


def test_resnet_r18_rejects_deform():
    with pytest.raises(ValueError, match="DEFORM_ON_PER_STAGE"):
        build_gfocal_resnet_backbone(
            make_cfg(18, deform=(False, True, True, True)), ShapeSpec(channels=3)
        )


def resnext_param_formula(blocks, groups, width_per_group):
    """Parameters (conv weights + BN weight/bias) of a ResNe(X)t bottom-up without the
    classifier."""
    n = 3 * 64 * 7 * 7 + 2 * 64  # stem
    cin = 64
    for k, nb in enumerate(blocks):
        w = groups * width_per_group * 2**k
        out = 256 * 2**k
        for b in range(nb):
            n += cin * w + 2 * w  # conv1 + bn1
            n += w * (w // groups) * 9 + 2 * w  # grouped conv2 + bn2
            n += w * out + 2 * out  # conv3 + bn3
            if b == 0:
                n += cin * out + 2 * out  # projection shortcut
            cin = out
    return n


@pytest.mark.parametrize("depth", [50, 101])
def test_resnet_param_count_equals_torchvision(depth):
    model = build_gfocal_resnet_backbone(
        make_cfg(depth, norm="BN", freeze_at=0), ShapeSpec(channels=3)
    )
    tv = getattr(torchvision.models, f"resnet{depth}")()
    expected = n_params(tv) - n_params(tv.fc)
    assert n_params(model) == expected
    assert expected == resnext_param_formula({50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth], 1, 64)


def test_resnext101_32x4d_param_count():
    model = build_gfocal_resnet_backbone(
        make_cfg(101, 32, 4, norm="BN", freeze_at=0), ShapeSpec(channels=3)
    )
    assert n_params(model) == resnext_param_formula((3, 4, 23, 3), 32, 4)
    # The same network in torchvision's generic ResNet class (torchvision ships only 32x8d).
    tv = torchvision.models.resnet.ResNet(
        torchvision.models.resnet.Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4
    )
    assert n_params(model) == n_params(tv) - n_params(tv.fc)


def test_deform_adds_only_offset_convs():
    plain = build_gfocal_resnet_backbone(
        make_cfg(50, norm="BN", freeze_at=0), ShapeSpec(channels=3)
    )
    dcn = build_gfocal_resnet_backbone(
        make_cfg(50, deform=(False, True, True, True), norm="BN", freeze_at=0),
        ShapeSpec(channels=3),
    )
    # One 3x3 conv (width -> 18, with bias) per block of res3-res5.
    extra = sum(n * (w * 18 * 9 + 18) for n, w in zip((4, 6, 3), (128, 256, 512)))
    assert n_params(dcn) - n_params(plain) == extra


def res2net_param_formula(blocks, base_width=26, scales=4, deform=(False,) * 4):
    """Parameters of a Res2Net v1d bottom-up (no classifier), counted from the architecture."""
    n = 3 * 32 * 9 + 2 * 32 + 32 * 32 * 9 + 2 * 32 + 32 * 64 * 9 + 2 * 64  # deep stem
    cin = 64
    for k, nb in enumerate(blocks):
        w = base_width * 2**k
        out = 256 * 2**k
        for b in range(nb):
            n += cin * w * scales + 2 * w * scales
            n += (scales - 1) * (w * w * 9 + 2 * w)
            if deform[k]:
                n += (scales - 1) * (w * 18 * 9 + 18)
            n += w * scales * out + 2 * out
            if b == 0:
                n += cin * out + 2 * out
            cin = out
    return n


def res2net_cfg(deform=(False,) * 4, norm="BN", freeze_at=0):
    cfg = make_cfg(101, deform=deform, norm=norm, freeze_at=freeze_at)
    cfg.MODEL.RES2NET.SCALES, cfg.MODEL.RES2NET.BASE_WIDTH = 4, 26
    return cfg


def test_res2net101_v1d_26w4s_params_and_forward():
    deform = (False, False, True, True)
    model = build_gfocal_res2net_backbone(res2net_cfg(deform), ShapeSpec(channels=3)).eval()
    assert n_params(model) == res2net_param_formula((3, 4, 23, 3), deform=deform)
    # Without DCN: the Res2Net authors' figure for res2net101_v1b_26w_4s is 45.23M with the
    # 1000-way classifier (2048 x 1000 + 1000).
    plain = build_gfocal_res2net_backbone(res2net_cfg(), ShapeSpec(channels=3))
    assert abs(n_params(plain) + 2048 * 1000 + 1000 - 45.23e6) < 0.01e6
    out = check_forward(model)
    assert [out[k].shape[1] for k in ALL_STAGES] == [256, 512, 1024, 2048]
    block = model.res3[0]
    assert isinstance(block, Bottle2neckBlock) and block.first_in_stage and block.width == 52
    keys = model.state_dict().keys()
    for k in [
        "stem.conv3.norm.weight",
        "res2.0.conv2.2.norm.weight",
        "res4.0.conv2_offset.1.weight",
        "res3.0.shortcut.weight",
    ]:
        assert k in keys


def test_res2net_fpn_backbone_registered():
    cfg = res2net_cfg((False, False, True, True), norm="FrozenBN", freeze_at=2)
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.NAME = "build_gfocal_res2net_fpn_backbone"
    backbone = build_backbone(cfg).eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 128, 128))
    assert {k: v.shape[-1] for k, v in out.items()} == {
        "p3": 16,
        "p4": 8,
        "p5": 4,
        "p6": 2,
        "p7": 1,
    }
    assert not any(p.requires_grad for p in backbone.bottom_up.stem.parameters())


def test_bn_eval_freezes_statistics_but_trains_affine():
    model = build_gfocal_resnet_backbone(
        make_cfg(50, norm="BNEval", freeze_at=2), ShapeSpec(channels=3)
    )
    # Frozen stages (stem, res2) are FrozenBN as usual; later stages are EvalBatchNorm2d.
    assert isinstance(model.stem.conv1.norm, FrozenBatchNorm2d) and isinstance(
        model.res2[0].conv1.norm, FrozenBatchNorm2d
    )
    bn = model.res3[0].conv1.norm
    assert isinstance(bn, EvalBatchNorm2d)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    before = (bn.running_mean.clone(), bn.running_var.clone())
    model.train()
    x = torch.randn(2, 3, 64, 64)
    model(x)["res5"].sum().backward()
    torch.testing.assert_close(bn.running_mean, before[0])
    torch.testing.assert_close(bn.running_var, before[1])
    assert bn.weight.requires_grad and bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0
    # Train mode and eval mode compute the same thing.
    with torch.no_grad():
        a = model(x)["res4"]
        b = model.eval()(x)["res4"]
    torch.testing.assert_close(a, b)


def test_detectron2_norms_keep_their_meaning():
    model = build_gfocal_resnet_backbone(
        make_cfg(50, norm="BN", freeze_at=0), ShapeSpec(channels=3)
    ).train()
    bn = model.res3[0].conv1.norm
    assert type(bn).__name__ == "BatchNorm2d" and not isinstance(bn, EvalBatchNorm2d)
    before = bn.running_mean.clone()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert not torch.equal(before, bn.running_mean)  # BN: statistics update in training
    frozen = build_gfocal_resnet_backbone(make_cfg(50, norm="FrozenBN"), ShapeSpec(channels=3))
    assert isinstance(frozen.res4[0].conv2.norm, FrozenBatchNorm2d)
    gn = build_gfocal_resnet_backbone(
        make_cfg(50, norm="GN", deform=(False, False, True, True)), ShapeSpec(channels=3)
    )
    assert isinstance(gn.res4[0].conv2.norm, torch.nn.GroupNorm)
