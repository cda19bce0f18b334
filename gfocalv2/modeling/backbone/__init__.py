"""Backbones of gfocalv2: ResNet/ResNeXt (optionally deformable, no compiled ops), Res2Net v1d,
any timm feature extractor, FPN.

Registered in Detectron2's ``BACKBONE_REGISTRY``: ``build_gfocal_resnet_fpn_backbone``
(fpn.py), ``build_gfocal_res2net_fpn_backbone`` (res2net.py) and ``build_timm_fpn_backbone``
(timm_backbone.py).
"""

from .fpn import LastLevelP6P7FromP5, build_gfocal_fpn, build_gfocal_resnet_fpn_backbone
from .res2net import (
    Bottle2neckBlock,
    DeepStem,
    build_gfocal_res2net_backbone,
    build_gfocal_res2net_fpn_backbone,
)
from .resnet import (
    DeformBottleneckBlock,
    DeformConv2d,
    EvalBatchNorm2d,
    build_gfocal_resnet_backbone,
    resolve_norm,
)
from .timm_backbone import TimmBackbone, TimmBackboneError, build_timm_fpn_backbone

__all__ = [
    "DeformBottleneckBlock",
    "DeformConv2d",
    "EvalBatchNorm2d",
    "build_gfocal_resnet_backbone",
    "resolve_norm",
    "LastLevelP6P7FromP5",
    "build_gfocal_fpn",
    "build_gfocal_resnet_fpn_backbone",
    "Bottle2neckBlock",
    "DeepStem",
    "build_gfocal_res2net_backbone",
    "build_gfocal_res2net_fpn_backbone",
    "TimmBackbone",
    "TimmBackboneError",
    "build_timm_fpn_backbone",
]
