"""Every yaml under configs/ and projects/*/configs builds its model and runs one forward pass
at 64x64 (eval mode, CPU; timm backbones without their pretrained weights, which would be
downloaded); the COCO leaf configs carry the published schedules, and the timm ConvNeXt-T
config the AdamW recipe of its sources."""

import glob
import os

import pytest
import torch

from tests.utils.workflow import REPO

from gfocalv2.engine import build_cfg

CONFIGS = sorted(
    glob.glob(str(REPO / "configs" / "**" / "*.yaml"), recursive=True)
    + glob.glob(str(REPO / "projects" / "*" / "configs" / "**" / "*.yaml"), recursive=True)
)
PUBLISHED = [
    "gfocalv2_R_50_FPN_1x.yaml",
    "gfocalv2_R_50_FPN_ms2x.yaml",
    "gfocalv2_R_101_FPN_ms2x.yaml",
    "gfocalv2_R_101_dcnv2_FPN_ms2x.yaml",
    "gfocalv2_X_101_dcnv2_FPN_ms2x.yaml",
    "gfocalv2_R2_101_dcnv2_FPN_ms2x.yaml",
    "gfl_R_50_FPN_1x.yaml",
]
#: COCO configs of other backbones, with a training recipe but no published GFocalV2 result.
RECIPES = ["gfocalv2_timm_convnext_tiny_FPN_1x.yaml", "gfocalv2_lite_lcnet_FPN_320.yaml"]
#: Overrides of the build test: CPU, small test images, and no download of timm weights (the
#: key exists in every config, whatever the backbone).
BUILD_OPTS = ["MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"]
BUILD_OPTS += ["MODEL.TIMM.PRETRAINED", "False"]


def _id(path):
    return os.path.relpath(path, REPO)


def test_every_published_model_has_a_config():
    names = {os.path.basename(p) for p in CONFIGS}
    assert set(PUBLISHED) <= names and set(RECIPES) <= names


@pytest.mark.parametrize("config_file", CONFIGS, ids=_id)
def test_config_builds_and_runs_forward(config_file):
    from detectron2.modeling import BACKBONE_REGISTRY, build_model

    cfg = build_cfg(config_file, BUILD_OPTS)
    if cfg.MODEL.BACKBONE.NAME not in BACKBONE_REGISTRY:
        pytest.skip(f"backbone builder {cfg.MODEL.BACKBONE.NAME!r} is not registered (yet)")
    model = build_model(cfg).eval()
    image = torch.randint(0, 256, (3, 64, 48), dtype=torch.uint8).float()
    with torch.no_grad():
        out = model([{"image": image, "height": 64, "width": 48}])
    inst = out[0]["instances"]
    assert inst.image_size == (64, 48)
    assert inst.pred_boxes.tensor.shape[1] == 4 and len(inst.scores) == len(inst.pred_classes)
    _check_inference_rewrites(cfg, model, image)


def _check_inference_rewrites(cfg, model, image):
    """The config's inference rewrites (BatchNorm folding, channels-last on CPU) keep the
    backbone's features, whatever the backbone (deformable, ResNeXt, Res2Net, trained BN)."""
    import copy

    from detectron2.layers import FrozenBatchNorm2d

    from gfocalv2.modeling.backbone import TimmBackbone
    from gfocalv2.modeling.inference_optimization import optimize_for_inference

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():  # non-trivial statistics, so that folding changes the weights
            if isinstance(m, (FrozenBatchNorm2d, torch.nn.modules.batchnorm._BatchNorm)):
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
        optimized = optimize_for_inference(copy.deepcopy(model), cfg)
    bn_types = (FrozenBatchNorm2d, torch.nn.modules.batchnorm._BatchNorm)
    # Every BatchNorm is folded (backbone, FPN, a BatchNorm head), except inside a timm feature
    # extractor, whose blocks are timm's, not Detectron2's Conv2d + norm (onnxruntime folds
    # those in the exported graph).
    bottom_up = optimized.backbone.bottom_up
    kept = set(bottom_up.model.modules()) if isinstance(bottom_up, TimmBackbone) else set()
    assert not any(isinstance(m, bn_types) and m not in kept for m in optimized.modules())
    with torch.no_grad():
        x = model.preprocess_image([{"image": image}]).tensor
        feats, feats_opt = model.backbone(x), optimized.backbone(x)
    for k, f in feats.items():
        assert torch.isfinite(f).all()
        assert (feats_opt[k] - f).abs().max() <= 1e-4 * f.abs().max(), k


@pytest.mark.parametrize("name", PUBLISHED)
def test_coco_schedules(name):
    cfg = build_cfg(str(REPO / "configs" / "COCO-Detection" / name), ["MODEL.DEVICE", "cpu"])
    assert cfg.MODEL.META_ARCHITECTURE == "GFocalV2"
    assert cfg.MODEL.GFOCAL.DGQP_ENABLED == (not name.startswith("gfl_"))
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.BASE_LR == 0.01
    if "ms2x" in name:
        assert cfg.SOLVER.MAX_ITER == 180000 and tuple(cfg.SOLVER.STEPS) == (120000, 160000)
        assert (
            tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (480, 960)
            and cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "range"
        )
    else:
        assert cfg.SOLVER.MAX_ITER == 90000 and tuple(cfg.SOLVER.STEPS) == (60000, 80000)
        assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (800,)
    assert cfg.MODEL.RESNETS.DEPTH == (101 if "101" in name else 50)
    if "dcnv2" in name:
        assert not cfg.MODEL.RESNETS.DEFORM_MODULATED and cfg.MODEL.RESNETS.DEFORM_NUM_GROUPS == 1
        expected = (
            [False, True, True, True]
            if name.startswith("gfocalv2_R_101")
            else [False, False, True, True]
        )
        assert list(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE) == expected
    if "_X_" in name:
        assert (cfg.MODEL.RESNETS.NUM_GROUPS, cfg.MODEL.RESNETS.WIDTH_PER_GROUP) == (32, 4)
    if "_R2_" in name:
        assert cfg.MODEL.BACKBONE.NAME == "build_gfocal_res2net_fpn_backbone"


def test_timm_convnext_tiny_recipe():
    """The ConvNeXt-T config: the AdamW recipe of MMDetection's Swin-T 1x / ConvNeXt-T configs
    and the ConvNeXt repository's (numbers and sources in the yaml), timm's pretrained weights,
    and the pixel normalization these weights were trained with."""
    import timm

    cfg = build_cfg(str(REPO / "configs" / "COCO-Detection" / RECIPES[0]), ["MODEL.DEVICE", "cpu"])
    assert cfg.MODEL.BACKBONE.NAME == "build_timm_fpn_backbone"
    assert cfg.MODEL.TIMM.NAME == "convnext_tiny.fb_in1k" and cfg.MODEL.TIMM.PRETRAINED
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0 and cfg.MODEL.TIMM.DROP_PATH_RATE == 0.4
    s = cfg.SOLVER
    assert (s.OPTIMIZER, s.BASE_LR, tuple(s.BETAS), s.WEIGHT_DECAY) == (
        "AdamW",
        1e-4,
        (0.9, 0.999),
        0.05,
    )
    assert s.WEIGHT_DECAY_NORM == 0.0 and s.WEIGHT_DECAY_BIAS == 0.0 and s.BIAS_LR_FACTOR == 1.0
    assert (s.WARMUP_METHOD, s.WARMUP_FACTOR, s.WARMUP_ITERS) == ("linear", 0.001, 1000)
    assert s.IMS_PER_BATCH == 16 and s.MAX_ITER == 90000 and tuple(s.STEPS) == (60000, 80000)
    assert not s.CLIP_GRADIENTS.ENABLED and not s.AMP.ENABLED
    # timm's mean/std of these weights (0-1 scale), in the base's 0-255 RGB
    pretrained = timm.models.get_pretrained_cfg(cfg.MODEL.TIMM.NAME).to_dict()
    assert cfg.INPUT.FORMAT == "RGB"
    assert list(cfg.MODEL.PIXEL_MEAN) == pytest.approx([255 * m for m in pretrained["mean"]])
    assert list(cfg.MODEL.PIXEL_STD) == pytest.approx([255 * v for v in pretrained["std"]])


def test_lite_config_is_nanodet_plus_recipe_with_the_measured_model():
    """The real-time config: NanoDet-Plus-m 320's head and AdamW recipe (numbers and source in the
    yaml), the backbone, head norm and candidates chosen by measurement (BENCHMARKS.md)."""
    cfg = build_cfg(str(REPO / "configs" / "COCO-Detection" / RECIPES[1]), ["MODEL.DEVICE", "cpu"])
    assert (cfg.MODEL.TIMM.NAME, cfg.MODEL.FPN.OUT_CHANNELS) == ("lcnet_100.ra2_in1k", 96)
    g = cfg.MODEL.GFOCAL
    assert list(g.IN_FEATURES) == ["p3", "p4", "p5", "p6"]
    assert (g.NUM_CONVS, g.NORM, g.REG_MAX, g.TOPK_CANDIDATES_TEST) == (2, "SyncBN", 7, 100)
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (320, 320)
    s = cfg.SOLVER
    assert (s.OPTIMIZER, s.BASE_LR, s.WEIGHT_DECAY, s.IMS_PER_BATCH) == ("AdamW", 0.001, 0.05, 96)
    assert (s.WARMUP_ITERS, s.WARMUP_FACTOR, s.LR_SCHEDULER_NAME) == (500, 1e-4, "WarmupCosineLR")
    assert s.CLIP_GRADIENTS.ENABLED and s.CLIP_GRADIENTS.CLIP_VALUE == 35.0
    assert s.MAX_ITER == 366000  # 300 epochs of 117,266 images at 96 per batch
