"""Only the pyramid levels the head reads are built, so that every trainable parameter gets a
gradient (DistributedDataParallel stops at the 2nd iteration on "parameters that were not used
in producing loss"); the full P3-P7 model keeps its parameter names (published weights and
existing checkpoints load); a backbone that computes unread levels with their own trainable
parameters is refused when the model is built."""

import pytest
import torch

from tests.utils.workflow import DIGITS_PROJECT, tiny_opts
from tests.utils.models import gfocal_cfg, random_input

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model
from detectron2.modeling.backbone import FPN
from detectron2.utils.events import EventStorage

from gfocalv2.engine import build_cfg
from gfocalv2.modeling.backbone import LastLevelP6P7FromP5, build_gfocal_resnet_backbone
from gfocalv2.modeling.backbone.fpn import head_in_features
from gfocalv2.modeling.backbone.fpn import unread_fpn_modules

CONFIGS = DIGITS_PROJECT / "configs"
P3_P6 = (
    "MODEL.GFOCAL.IN_FEATURES",
    ["p3", "p4", "p5", "p6"],
    "MODEL.ANCHOR_GENERATOR.SIZES",
    [[32], [64], [128], [256]],
)
P3_P5 = (
    "MODEL.GFOCAL.IN_FEATURES",
    ["p3", "p4", "p5"],
    "MODEL.ANCHOR_GENERATOR.SIZES",
    [[32], [64], [128]],
)
TOP_BLOCK_P6 = {"top_block.p6.weight", "top_block.p6.bias"}
TOP_BLOCK_P6_P7 = TOP_BLOCK_P6 | {"top_block.p7.weight", "top_block.p7.bias"}


def digits_cfg(tmp_path, name="gfocalv2_R_18_digits.yaml"):
    return build_cfg(str(CONFIGS / name), tiny_opts(tmp_path))


def model_cfg(which, tmp_path):
    if which == "digits":
        return digits_cfg(tmp_path)
    if which == "p3-p6":
        return gfocal_cfg(*P3_P6, tiny=True)
    return gfocal_cfg(tiny=True)  # p3-p7


def num_classes(cfg):
    key = cfg.MODEL.GFOCAL if cfg.MODEL.META_ARCHITECTURE == "GFocalV2" else cfg.MODEL.RETINANET
    return key.NUM_CLASSES


def unused_after_one_step(model, cfg, size=128):
    """Names of the trainable parameters without a gradient after one training forward +
    backward."""
    g = torch.Generator().manual_seed(0)
    batch = [random_input(g, size, size, 3, num_classes(cfg)) for _ in range(2)]
    model.train()
    with EventStorage(0):  # Detectron2's RetinaNet/FCOS log to it
        losses = model(batch)
    sum(losses.values()).backward()
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize(
    "which, levels",
    [
        ("digits", ["p3", "p4", "p5"]),
        ("p3-p6", ["p3", "p4", "p5", "p6"]),
        ("p3-p7", ["p3", "p4", "p5", "p6", "p7"]),
    ],
)
def test_every_trainable_parameter_gets_a_gradient(which, levels, tmp_path):
    cfg = model_cfg(which, tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert sorted(model.backbone.output_shape()) == levels
    assert unused_after_one_step(model, cfg) == []


@pytest.mark.parametrize("name", ["retinanet_R_18_digits.yaml", "fcos_R_18_digits.yaml"])
def test_digit_scenes_comparison_models_build_only_their_levels(name, tmp_path):
    cfg = digits_cfg(tmp_path, name)
    assert head_in_features(cfg) == ["p3", "p4", "p5"]  # MODEL.RETINANET.IN_FEATURES
    torch.manual_seed(0)
    model = build_model(cfg)
    assert sorted(model.backbone.output_shape()) == ["p3", "p4", "p5"]
    assert unused_after_one_step(model, cfg, size=96) == []


def test_unknown_meta_architecture_gets_every_level():
    cfg = gfocal_cfg(*P3_P5, tiny=True)
    cfg.MODEL.META_ARCHITECTURE = "SomeoneElsesDetector"
    assert head_in_features(cfg) is None
    assert sorted(build_backbone(cfg).output_shape()) == ["p3", "p4", "p5", "p6", "p7"]


def _backbone_keys(model):
    return {
        k[len("backbone.") :]: tuple(v.shape)
        for k, v in model.state_dict().items()
        if k.startswith("backbone.")
    }


def test_state_dict_keys_of_each_pyramid():
    cfg = gfocal_cfg(tiny=True)
    # The full P3-P7 backbone as it was always built: same names, shapes and initial values
    # (from the same seed).
    torch.manual_seed(0)
    reference = FPN(
        bottom_up=build_gfocal_resnet_backbone(cfg, ShapeSpec(channels=3)),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7FromP5(cfg.MODEL.FPN.OUT_CHANNELS, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
    # then the reference's FPN init (xavier uniform, zero bias) replaces FPN's c2_xavier_fill,
    # finest level first, lateral before output (the P6/P7 block inits itself so)
    for k in (3, 4, 5):
        for conv in (getattr(reference, f"fpn_lateral{k}"), getattr(reference, f"fpn_output{k}")):
            torch.nn.init.xavier_uniform_(conv.weight)
            torch.nn.init.zeros_(conv.bias)
    torch.manual_seed(0)
    full = build_model(cfg)
    ref_state = reference.state_dict()
    assert _backbone_keys(full) == {k: tuple(v.shape) for k, v in ref_state.items()}
    for k, v in full.backbone.state_dict().items():
        torch.testing.assert_close(v, ref_state[k], rtol=0, atol=0, msg=k)
    full_keys = _backbone_keys(full)
    assert {k for k in full_keys if k.startswith("top_block.")} == TOP_BLOCK_P6_P7

    p3_p6 = _backbone_keys(build_model(gfocal_cfg(*P3_P6, tiny=True)))
    assert {k for k in p3_p6 if k.startswith("top_block.")} == TOP_BLOCK_P6
    assert p3_p6 == {k: v for k, v in full_keys.items() if k not in TOP_BLOCK_P6_P7 - TOP_BLOCK_P6}

    p3_p5 = _backbone_keys(build_model(gfocal_cfg(*P3_P5, tiny=True)))
    assert not any("top_block" in k for k in p3_p5)
    assert p3_p5 == {k: v for k, v in full_keys.items() if not k.startswith("top_block.")}

    # A head on p4-p7 needs no res3 lateral/output convs.
    p4_p7 = _backbone_keys(
        build_model(
            gfocal_cfg(
                "MODEL.GFOCAL.IN_FEATURES",
                ["p4", "p5", "p6", "p7"],
                "MODEL.ANCHOR_GENERATOR.SIZES",
                [[64], [128], [256], [512]],
                tiny=True,
            )
        )
    )
    assert p4_p7 == {
        k: v for k, v in full_keys.items() if not k.startswith(("fpn_lateral3.", "fpn_output3."))
    }


def test_digit_scenes_model_has_no_top_block(tmp_path):
    cfg = digits_cfg(tmp_path)
    keys = build_model(cfg).state_dict()
    assert "backbone.fpn_output5.weight" in keys and not any("top_block" in k for k in keys)


# ------------------------------------------------------------------ structural check at build time
D2_FPN = (
    "MODEL.BACKBONE.NAME",
    "build_retinanet_resnet_fpn_backbone",
)  # P6/P7 from res5, always built


def test_backbone_with_unread_levels_is_refused():
    with pytest.raises(ValueError) as e:
        build_model(gfocal_cfg(*D2_FPN, *P3_P5, tiny=True))
    msg = str(e.value)
    assert "MODEL.GFOCAL.IN_FEATURES ['p3', 'p4', 'p5']" in msg and "['p6', 'p7']" in msg
    assert all(
        f"backbone.top_block.{n}" in msg for n in ("p6.weight", "p6.bias", "p7.weight", "p7.bias")
    )

    with pytest.raises(ValueError) as e:  # P6 feeds the unread P7 only through P7's own conv
        build_model(gfocal_cfg(*D2_FPN, *P3_P6, tiny=True))
    assert "backbone.top_block.p7.weight" in str(e.value) and "top_block.p6" not in str(e.value)

    with pytest.raises(
        ValueError,
        match=r"fpn_lateral3.weight.*fpn_output3.weight|fpn_output3.weight.*fpn_lateral3.weight",
    ):
        build_model(
            gfocal_cfg(
                *D2_FPN,
                "MODEL.GFOCAL.IN_FEATURES",
                ["p4", "p5", "p6", "p7"],
                "MODEL.ANCHOR_GENERATOR.SIZES",
                [[64], [128], [256], [512]],
                tiny=True,
            )
        )


def test_structural_check_accepts_what_is_read_and_skips_unknown_backbones():
    model = build_model(gfocal_cfg(*D2_FPN, tiny=True))  # p3-p7 all read
    assert unread_fpn_modules(model.backbone, model.head_in_features) == []
    assert unread_fpn_modules(model.backbone, ["p3", "p4", "p5"]) == ["top_block"]
    assert unread_fpn_modules(model.backbone.bottom_up, ["res3"]) is None  # not an FPN: unknown

    # P7 read but P6 not: P6's conv still computes P7; P3 read, so every lateral is used.
    # Detectron2's P6 comes from res5, ours from the P5 output.
    assert unread_fpn_modules(model.backbone, ["p3", "p7"]) == ["fpn_output4", "fpn_output5"]
    ours = build_model(gfocal_cfg(tiny=True)).backbone
    assert unread_fpn_modules(ours, ["p3", "p7"]) == ["fpn_output4"]
    # A gap in the FPN levels leaves that level's output conv unused.
    assert unread_fpn_modules(model.backbone, ["p3", "p5", "p6", "p7"]) == ["fpn_output4"]
