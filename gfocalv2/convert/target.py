"""The target model of a conversion (its config and state dict) and the comparison of the
converted tensors with it."""

import re
from collections import OrderedDict
from typing import Dict

import torch

from .backbone import BackboneInfo
from .report import ConversionError, ConversionReport

# Buffers of the target model that a checkpoint need not fill.
_TARGET_OPTIONAL = (
    re.compile(r".*num_batches_tracked$"),  # BatchNorm's step counter (unused: momentum is set)
    re.compile(r"^pixel_(mean|std)$"),  # set from the config
    re.compile(r".*anchor_generator\.cell_anchors.*"),  # recomputed from the config
)


def check_against_model(
    converted: Dict[str, torch.Tensor],
    target: Dict[str, torch.Tensor],
    report: ConversionReport,
    source_of=None,
):
    """Compare converted tensors with a target state dict: shape mismatches raise, the rest
    is reported."""
    source_of = source_of or {t: s for s, t in report.converted}
    for k, v in converted.items():
        if k not in target:
            report.unexpected.append(k)
            continue
        if tuple(v.shape) != tuple(target[k].shape):
            raise ConversionError(
                f"shape mismatch for {k} (from source key {source_of.get(k, '?')}): "
                f"converted {tuple(v.shape)}, model expects {tuple(target[k].shape)}"
            )
    for k in target:
        if k not in converted and not any(p.match(k) for p in _TARGET_OPTIONAL):
            report.missing.append(k)
    return report


def build_target_cfg(
    info: BackboneInfo,
    *,
    detector: bool,
    num_classes=80,
    reg_max=16,
    dgqp=None,
    config_file=None,
    opts=(),
):
    """A Detectron2 config for the converted weights: ``config_file`` + ``opts`` if given, else
    ``configs/Base-GFocalV2.yaml`` with the backbone ``info`` describes and the head's sizes."""
    from gfocalv2.config import config_file_path
    from gfocalv2.engine import build_cfg

    if config_file:
        return build_cfg(config_file, list(opts) + ["MODEL.DEVICE", "cpu"], freeze=False)
    cfg = build_cfg(config_file_path("Base-GFocalV2.yaml"), ["MODEL.DEVICE", "cpu"], freeze=False)
    r = cfg.MODEL.RESNETS
    r.DEPTH = info.depth
    if not detector:  # the bottom-up backbone alone, as ImageNet checkpoints hold it
        r.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    if info.depth in (18, 34):
        r.RES2_OUT_CHANNELS = 64
    if info.family == "res2net":
        cfg.MODEL.RES2NET.SCALES = info.scales
        cfg.MODEL.RES2NET.BASE_WIDTH = info.width_per_group
        cfg.MODEL.BACKBONE.NAME = "build_gfocal_res2net_fpn_backbone"
    else:
        r.NUM_GROUPS = info.num_groups
        r.WIDTH_PER_GROUP = info.width_per_group
    r.DEFORM_ON_PER_STAGE = list(info.deform_on_per_stage)
    r.DEFORM_MODULATED = info.deform_modulated
    r.DEFORM_NUM_GROUPS = info.deform_num_groups
    g = cfg.MODEL.GFOCAL
    g.NUM_CLASSES = num_classes
    g.REG_MAX = reg_max
    if dgqp is None:
        g.DGQP_ENABLED = False
    else:
        g.DGQP_ENABLED = True
        g.DGQP_TOPK, g.DGQP_ADD_MEAN, g.DGQP_CHANNELS = dgqp
    return cfg


def build_target_state(cfg, detector: bool) -> Dict[str, torch.Tensor]:
    """State dict (shapes only matter) of the model ``cfg`` describes, or of its bottom-up
    backbone."""
    from detectron2.layers import ShapeSpec

    from .. import modeling  # noqa: F401  (registers GFocalV2 and its backbones)

    if detector:
        from detectron2.modeling import build_model

        model = build_model(cfg)
    else:
        from gfocalv2.modeling.backbone.res2net import build_gfocal_res2net_backbone
        from gfocalv2.modeling.backbone.resnet import build_gfocal_resnet_backbone

        build = (
            build_gfocal_res2net_backbone
            if "res2net" in cfg.MODEL.BACKBONE.NAME
            else build_gfocal_resnet_backbone
        )
        bottom_up = build(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        return OrderedDict(
            ("backbone.bottom_up." + k, v) for k, v in bottom_up.state_dict().items()
        )
    return model.state_dict()
