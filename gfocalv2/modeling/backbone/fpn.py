"""FPN with the reference's P6/P7: from the P5 *output*, no ReLU between P6 and P7.

Detectron2's RetinaNet FPN instead takes P6 from C5 and applies a ReLU before P7;
the authors' GFocal (MMDetection ``add_extra_convs='on_output'``,
``relu_before_extra_convs=False``) does not.
"""
from torch import nn

import fvcore.nn.weight_init as weight_init
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN

from .resnet import build_gfocal_resnet_backbone

__all__ = ["LastLevelP6P7FromP5", "build_gfocal_fpn", "build_gfocal_resnet_fpn_backbone"]


class LastLevelP6P7FromP5(nn.Module):
    """P6 = conv3x3/2(P5), P7 = conv3x3/2(P6), with no activation in between.

    Input: P5 of shape (N, C, H, W); outputs [P6 (N, C, H/2, W/2), P7 (N, C, H/4, W/4)].
    """

    def __init__(self, channels: int, in_feature: str = "p5"):
        super().__init__()
        self.num_levels = 2
        self.in_feature = in_feature
        self.p6 = nn.Conv2d(channels, channels, 3, 2, 1)
        self.p7 = nn.Conv2d(channels, channels, 3, 2, 1)
        for module in (self.p6, self.p7):
            weight_init.c2_xavier_fill(module)

    def forward(self, p5):
        p6 = self.p6(p5)
        p7 = self.p7(p6)
        return [p6, p7]


def build_gfocal_fpn(cfg, bottom_up):
    """Detectron2 FPN over ``MODEL.FPN.IN_FEATURES`` of ``bottom_up``, plus P6/P7 from P5.

    The output features are p3..p7 (strides 8..128) when the inputs are res3..res5.
    """
    in_features = cfg.MODEL.FPN.IN_FEATURES
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    last_level = "p" + str(int(in_features[-1][-1]))  # "res5" -> "p5"
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7FromP5(out_channels, in_feature=last_level),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_gfocal_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet (plain, ResNeXt or deformable, per ``MODEL.RESNETS.*``) + FPN + P6/P7 from P5."""
    return build_gfocal_fpn(cfg, build_gfocal_resnet_backbone(cfg, input_shape))
