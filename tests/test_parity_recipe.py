"""Recipe parity with the authors' code (issue 13): weight decay on every parameter (norms and
biases included), images without annotations dropped from training, xavier-uniform FPN convs.

The published configs (configs/COCO-Detection/*.yaml) are read with build_cfg as a user would;
only the model is shrunk (R-18, 64 FPN channels) where a model is built, so that the tests are
fast; the solver/data keys are the configs' own."""

import math

import pytest
import torch
from torch import nn

from tests.utils.workflow import DIGITS_PROJECT, REPO
from tests.utils.reliability import dump, register, write_coco

from gfocalv2.engine import build_cfg

COCO = REPO / "configs" / "COCO-Detection"
#: The authors' published models (the timm ConvNeXt-T and lite configs have recipes of their own,
#: AdamW: tests/test_configs.py).
PUBLISHED = sorted(
    p.name for p in COCO.glob("*.yaml") if "_timm_" not in p.name and "_lite_" not in p.name
)
BASE = REPO / "configs" / "Base-GFocalV2.yaml"
DIGITS_BASE = DIGITS_PROJECT / "configs" / "Base-DigitScenes.yaml"

#: The reference's weight decay, on every parameter (MMDetection's SGD without paramwise_cfg).
REFERENCE_DECAY = 1e-4

#: A small model of the same kind: ResNet with the config's norm (BNEval) and frozen stages, FPN,
#: GroupNorm head. Only the model is shrunk; the solver keys are the config's.
TINY_MODEL = [
    "MODEL.DEVICE",
    "cpu",
    "MODEL.BACKBONE.NAME",
    "build_gfocal_resnet_fpn_backbone",  # the Res2Net config too
    "MODEL.RESNETS.DEPTH",
    "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "64",
    "MODEL.RESNETS.NUM_GROUPS",
    "1",
    "MODEL.RESNETS.WIDTH_PER_GROUP",
    "64",
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE",
    "[False, False, False, False]",
    "MODEL.FPN.OUT_CHANNELS",
    "64",
    "MODEL.GFOCAL.NUM_CONVS",
    "1",
]


def test_every_published_config_is_tested():
    assert len(PUBLISHED) == 7 and "gfocalv2_R_50_FPN_1x.yaml" in PUBLISHED


# ----------------------------------------------------------------------------- 3. weight decay
def _decay_per_parameter(cfg, model):
    from gfocalv2.engine import Trainer

    optimizer = Trainer.build_optimizer(cfg, model)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in {id(q) for q in decay}, "a parameter is in two groups"
            decay[names[id(p)]] = group["weight_decay"]
    return decay


def _norm_parameter_names(model):
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    return {
        f"{m_name}.{p_name}" if m_name else p_name
        for m_name, m in model.named_modules()
        if isinstance(m, norm_types)
        for p_name, p in m.named_parameters(recurse=False)
        if p.requires_grad
    }


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_decay_every_parameter_like_the_reference(name):
    from detectron2.modeling import build_model

    cfg = build_cfg(str(COCO / name), TINY_MODEL)
    assert cfg.SOLVER.WEIGHT_DECAY == REFERENCE_DECAY
    torch.manual_seed(0)
    model = build_model(cfg)
    decay = _decay_per_parameter(cfg, model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(decay) == trainable  # every trainable parameter is optimized, once
    norms = _norm_parameter_names(model)
    biases = {n for n in trainable if n.endswith(".bias")}
    # the model has what the test is about: trained BN affine params (backbone), GN (head), biases
    assert any(n.startswith("backbone.bottom_up.res3") and n in norms for n in trainable)
    assert any(n.startswith("head.") and n in norms for n in trainable)
    assert {n for n in biases if n not in norms}
    wrong = {n: d for n, d in decay.items() if d != REFERENCE_DECAY}
    assert not wrong, f"parameters without the reference's weight decay {REFERENCE_DECAY}: {wrong}"


def test_detectron2_norm_decay_is_still_available():
    from detectron2.modeling import build_model

    cfg = build_cfg(
        str(COCO / "gfocalv2_R_50_FPN_1x.yaml"), TINY_MODEL + ["SOLVER.WEIGHT_DECAY_NORM", "0.0"]
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    decay = _decay_per_parameter(cfg, model)
    norms = _norm_parameter_names(model)
    assert norms and all(decay[n] == 0.0 for n in norms)
    assert all(d == REFERENCE_DECAY for n, d in decay.items() if n not in norms)


# ----------------------------------------------------------------------------- 4. empty images
@pytest.fixture(scope="module")
def one_empty_image(tmp_path_factory):
    """A 3-image COCO dataset whose second image has no annotation."""
    root = tmp_path_factory.mktemp("parity_empty")
    json_path, image_dir, data = write_coco(root, sizes=[(64, 64)] * 3, boxes_per_image=1, seed=3)
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 2]
    dump(data, json_path)
    return register("parity_one_empty", json_path, image_dir), "img_1.png"


def _files_seen(config_file, dataset, extra=()):
    from gfocalv2.data import build_resumable_train_loader

    cfg = build_cfg(
        str(config_file),
        [
            "MODEL.DEVICE",
            "cpu",
            "DATASETS.TRAIN",
            f"('{dataset}',)",
            "MODEL.GFOCAL.NUM_CLASSES",
            "3",
            "INPUT.MIN_SIZE_TRAIN",
            "(64,)",
            "INPUT.MAX_SIZE_TRAIN",
            "64",
            "SOLVER.IMS_PER_BATCH",
            "1",
            "DATALOADER.NUM_WORKERS",
            "0",
            "SEED",
            "0",
            *extra,
        ],
    )
    loader = build_resumable_train_loader(cfg)
    it = iter(loader)
    seen = [next(it)[0]["file_name"] for _ in range(9)]  # 3 epochs of 3 images, or 4.5 of 2
    return cfg, len(loader.dataset), {s.rsplit("/", 1)[-1] for s in seen}


@pytest.mark.parametrize(
    "config_file", [BASE, COCO / "gfocalv2_R_50_FPN_1x.yaml"], ids=lambda p: p.name
)
def test_published_configs_drop_images_without_annotations(config_file, one_empty_image):
    dataset, empty = one_empty_image
    cfg, num_images, seen = _files_seen(config_file, dataset)
    assert num_images == 2 and empty not in seen and len(seen) == 2
    assert cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS is True


def test_images_without_annotations_are_kept_with_the_key_false(one_empty_image):
    dataset, empty = one_empty_image
    cfg, num_images, seen = _files_seen(
        BASE, dataset, ["DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False"]
    )
    assert num_images == 3 and empty in seen and len(seen) == 3


def test_every_published_coco_config_filters_empty_images():
    for name in PUBLISHED:
        assert (
            build_cfg(str(COCO / name), ["MODEL.DEVICE", "cpu"]).DATALOADER.FILTER_EMPTY_ANNOTATIONS
            is True
        ), name


def test_digit_scenes_keeps_its_images_without_annotations():
    for path in sorted((DIGITS_PROJECT / "configs").glob("*.yaml")):
        cfg = build_cfg(str(path), ["MODEL.DEVICE", "cpu"])
        assert cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS is False, path.name


# ----------------------------------------------------------------------------- 6. FPN init
def _xavier_bound(weight):
    """The bound of nn.init.xavier_uniform_ (gain 1), computed here from the shape."""
    receptive = weight[0, 0].numel()
    fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
    return math.sqrt(6.0 / (fan_in + fan_out))


def _fpn_convs(fpn):
    """(name, conv) of every conv of the FPN proper: laterals, outputs and the top block (P6/P7)."""
    return [
        (n, m)
        for n, m in fpn.named_modules()
        if isinstance(m, nn.Conv2d) and not n.startswith("bottom_up.")
    ]


def _check_xavier_uniform(convs):
    assert convs
    for name, conv in convs:
        w = conv.weight.detach()
        bound = _xavier_bound(w)
        assert w.abs().max() <= bound, name
        if w.numel() >= 4096:  # the max of n uniform draws is within a fraction ~1/n of the bound
            assert w.abs().max() >= 0.99 * bound, (name, w.abs().max().item(), bound)
            # and the spread is uniform's: std = bound / sqrt(3)
            assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.05, name
        if conv.bias is not None:
            assert torch.equal(conv.bias.detach(), torch.zeros_like(conv.bias)), name


@pytest.mark.parametrize(
    "config_file, levels",
    [
        (COCO / "gfocalv2_R_50_FPN_1x.yaml", ["p3", "p4", "p5", "p6", "p7"]),
        (
            DIGITS_PROJECT / "configs" / "gfocalv2_R_18_digits.yaml",
            ["p3", "p4", "p5"],
        ),  # FPN with GN, no bias
    ],
    ids=lambda v: getattr(v, "name", None),
)
def test_fpn_convs_are_xavier_uniform(config_file, levels):
    from detectron2.modeling import build_backbone

    cfg = build_cfg(str(config_file), TINY_MODEL)
    torch.manual_seed(0)
    fpn = build_backbone(cfg)
    assert sorted(fpn.output_shape()) == levels
    convs = _fpn_convs(fpn)
    names = {n.split(".")[0] for n, _ in convs}
    expected = {f"fpn_lateral{k}" for k in (3, 4, 5)} | {f"fpn_output{k}" for k in (3, 4, 5)}
    if "p7" in levels:
        expected |= {"top_block"}
        assert {n for n, _ in convs if n.startswith("top_block.")} == {
            "top_block.p6",
            "top_block.p7",
        }
    assert names == expected
    # the laterals map 128/256/512 channels to 64: xavier's bound differs from c2_xavier_fill's
    # there
    assert any(c.in_channels != c.out_channels for _, c in convs)
    _check_xavier_uniform(convs)


def test_p6_p7_block_is_xavier_uniform():
    from gfocalv2.modeling.backbone import LastLevelP6P7FromP5

    torch.manual_seed(0)
    for num_levels in (1, 2):
        block = LastLevelP6P7FromP5(96, num_levels=num_levels)
        _check_xavier_uniform(
            [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Conv2d)]
        )
