"""Res2Net v1d (deep stem, average-pool downsampling) as a Detectron2 backbone.

Res2Net (Gao et al., TPAMI 2019) splits the 3x3 conv of every bottleneck into
``scales`` groups of ``width`` channels: split 0 goes through a 3x3 conv, split i
(1 <= i < scales - 1) through a 3x3 conv after adding the previous conv's output
("hierarchical" residual), and the last split passes through unchanged. The first
block of a stage ("stype=stage") has no hierarchical additions and, when it
downsamples, average-pools (3x3, the block's stride, padding 1) the last split.

The "v1d" variant used by the reference (``Res2Net-101-v1d-26w-4s``) has

* a deep stem: three 3x3 convs (3 -> 32 stride 2, 32 -> 32, 32 -> 64), each with norm
  and ReLU, then a 3x3 stride-2 max pool;
* downsampling shortcuts made of an average pool (kernel = stride = the block's
  stride, ``ceil_mode=True``, ``count_include_pad=False``) followed by a stride-1
  1x1 conv and norm.

This follows MMDetection's ``Res2Net`` (which trained the authors' checkpoints):
the stride-1 first block of res2 passes its last split through without pooling.
Deformable convs (torchvision, no compiled ops) replace each of the ``scales - 1``
3x3 convs of a block in the stages of ``MODEL.RESNETS.DEFORM_ON_PER_STAGE``.

Parameter names, Detectron2 style::

    stem.conv1, stem.conv1.norm, stem.conv2, stem.conv2.norm, stem.conv3, stem.conv3.norm
    res{2..5}.{i}.conv1 (+ .norm)          1x1, C_in -> width * scales
    res{2..5}.{i}.conv2.{j} (+ .norm)      3x3 (or deformable), width -> width, j < scales - 1
    res{2..5}.{i}.conv2_offset.{j}         3x3 offset (+ mask) conv of conv2.{j} (DCN only)
    res{2..5}.{i}.conv3 (+ .norm)          1x1, width * scales -> C_out
    res{2..5}.0.shortcut (+ .norm)         1x1 after the average pool

Config: ``MODEL.RES2NET.SCALES`` and ``MODEL.RES2NET.BASE_WIDTH`` (see
:mod:`gfocalv2.config`); everything else is read from ``MODEL.RESNETS``
(DEPTH 50/101/152, NORM, OUT_FEATURES, STEM_OUT_CHANNELS, RES2_OUT_CHANNELS,
DEFORM_ON_PER_STAGE, DEFORM_MODULATED, DEFORM_NUM_GROUPS) and
``MODEL.BACKBONE.FREEZE_AT``, with the same meaning as for ResNet.
"""

import math

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.layers import CNNBlockBase, Conv2d, ShapeSpec, get_norm
from detectron2.modeling.backbone import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import ResNet
from torch import nn

from .resnet import DeformConv2d, deform_conv_forward, resolve_norm

__all__ = [
    "DeepStem",
    "Bottle2neckBlock",
    "build_gfocal_res2net_backbone",
    "build_gfocal_res2net_fpn_backbone",
]

RES2NET_BLOCKS_PER_STAGE = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


class DeepStem(CNNBlockBase):
    """v1d deep stem: 3x3/2 conv (C_in -> C/2), 3x3 (C/2 -> C/2), 3x3 (C/2 -> C), each
    + norm + ReLU; 3x3/2 max pool.

    Input (N, C_in, H, W) -> output (N, C, H / 4, W / 4) (rounded up).
    """

    def __init__(self, in_channels=3, out_channels=64, norm="BN"):
        super().__init__(in_channels, out_channels, 4)
        mid = out_channels // 2
        self.conv1 = Conv2d(
            in_channels, mid, 3, stride=2, padding=1, bias=False, norm=get_norm(norm, mid)
        )
        self.conv2 = Conv2d(mid, mid, 3, stride=1, padding=1, bias=False, norm=get_norm(norm, mid))
        self.conv3 = Conv2d(
            mid, out_channels, 3, stride=1, padding=1, bias=False, norm=get_norm(norm, out_channels)
        )
        for layer in (self.conv1, self.conv2, self.conv3):
            weight_init.c2_msra_fill(layer)

    def forward(self, x):
        x = F.relu_(self.conv1(x))
        x = F.relu_(self.conv2(x))
        x = F.relu_(self.conv3(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class Bottle2neckBlock(CNNBlockBase):
    """Res2Net bottleneck: 1x1 -> ``scales`` splits with hierarchical 3x3 convs -> 1x1, plus
    shortcut.

    Args:
        width: channels per split; the 1x1 convs use ``width * scales`` channels.
        first_in_stage: "stype=stage" block (no hierarchical additions; with stride > 1
            the last split is average-pooled 3x3/stride, padding 1).
        deform: use deformable 3x3 convs (offsets from a zero-initialized 3x3 conv
            per split); ``deform_modulated``: DCNv2 (mask) instead of DCNv1.

    Input (N, C_in, H, W) -> output (N, C_out, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        *,
        width,
        scales=4,
        stride=1,
        norm="BN",
        first_in_stage=False,
        dilation=1,
        deform=False,
        deform_modulated=False,
        deform_num_groups=1,
    ):
        super().__init__(in_channels, out_channels, stride)
        if scales < 2:
            raise ValueError("Res2Net needs SCALES >= 2 (SCALES = 1 is a plain ResNet)")
        self.width = width
        self.scales = scales
        self.first_in_stage = first_in_stage
        self.deform = deform
        self.deform_modulated = deform_modulated
        inner = width * scales

        if stride != 1 or in_channels != out_channels:
            # v1d: average-pool first (in forward), then a stride-1 1x1 projection.
            self.shortcut = Conv2d(
                in_channels, out_channels, 1, bias=False, norm=get_norm(norm, out_channels)
            )
        else:
            self.shortcut = None

        self.conv1 = Conv2d(in_channels, inner, 1, bias=False, norm=get_norm(norm, inner))
        if deform:
            n_off = (27 if deform_modulated else 18) * deform_num_groups
            self.conv2_offset = nn.ModuleList(
                Conv2d(width, n_off, 3, stride=stride, padding=dilation, dilation=dilation)
                for _ in range(scales - 1)
            )
            self.conv2 = nn.ModuleList(
                DeformConv2d(
                    width,
                    width,
                    3,
                    stride=stride,
                    padding=dilation,
                    dilation=dilation,
                    deformable_groups=deform_num_groups,
                    bias=False,
                    norm=get_norm(norm, width),
                )
                for _ in range(scales - 1)
            )
        else:
            self.conv2 = nn.ModuleList(
                Conv2d(
                    width,
                    width,
                    3,
                    stride=stride,
                    padding=dilation,
                    dilation=dilation,
                    bias=False,
                    norm=get_norm(norm, width),
                )
                for _ in range(scales - 1)
            )
        self.conv3 = Conv2d(inner, out_channels, 1, bias=False, norm=get_norm(norm, out_channels))

        for layer in [self.conv1, *self.conv2, self.conv3, self.shortcut]:
            if layer is not None:
                weight_init.c2_msra_fill(layer)
        if deform:
            for layer in self.conv2_offset:
                nn.init.constant_(layer.weight, 0)
                nn.init.constant_(layer.bias, 0)

    def _conv2(self, j, x):
        if self.deform:
            return deform_conv_forward(
                self.conv2[j], self.conv2_offset[j], x, self.deform_modulated
            )
        return self.conv2[j](x)

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        splits = torch.split(out, self.width, dim=1)  # scales x (N, width, H, W)
        outs = []
        sp = None
        for j in range(self.scales - 1):
            sp = splits[j] if (j == 0 or self.first_in_stage) else sp + splits[j]
            sp = F.relu_(self._conv2(j, sp.contiguous()))
            outs.append(sp)
        last = splits[-1]
        if self.first_in_stage and self.stride != 1:
            last = F.avg_pool2d(last, kernel_size=3, stride=self.stride, padding=1)
        outs.append(last)
        out = self.conv3(torch.cat(outs, dim=1))

        if self.shortcut is not None:
            shortcut = x
            if self.stride != 1:
                shortcut = F.avg_pool2d(
                    x,
                    kernel_size=self.stride,
                    stride=self.stride,
                    ceil_mode=True,
                    count_include_pad=False,
                )
            shortcut = self.shortcut(shortcut)
        else:
            shortcut = x
        out += shortcut
        return F.relu_(out)


def res2net_widths(base_width, res2_out_channels=256):
    """Per-stage split width: floor(planes * base_width / 64),
    planes = res2_out_channels / 4 * 2^k."""
    planes = res2_out_channels // 4
    return [int(math.floor(planes * 2**k * base_width / 64)) for k in range(4)]


def build_gfocal_res2net_backbone(cfg, input_shape):
    """Res2Net v1d from ``MODEL.RES2NET`` and ``MODEL.RESNETS`` (see the module doc).

    Returns:
        detectron2.modeling.backbone.ResNet with a :class:`DeepStem` and
        :class:`Bottle2neckBlock` stages.
    """
    r = cfg.MODEL.RESNETS
    scales, base_width = cfg.MODEL.RES2NET.SCALES, cfg.MODEL.RES2NET.BASE_WIDTH
    if r.DEPTH not in RES2NET_BLOCKS_PER_STAGE:
        raise ValueError(
            f"Res2Net depth must be one of {sorted(RES2NET_BLOCKS_PER_STAGE)}, got {r.DEPTH}"
        )
    if r.RES5_DILATION not in (1, 2):
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION must be 1 or 2, got {r.RES5_DILATION}")
    deform_on_per_stage = list(r.DEFORM_ON_PER_STAGE)
    if len(deform_on_per_stage) != 4:
        raise ValueError(
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE needs 4 entries (res2..res5), got "
            f"{deform_on_per_stage}"
        )
    norm = resolve_norm(r.NORM)

    stem = DeepStem(input_shape.channels, r.STEM_OUT_CHANNELS, norm=norm)
    in_channels, out_channels = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    widths = res2net_widths(base_width, out_channels)
    stages = []
    for idx, n in enumerate(RES2NET_BLOCKS_PER_STAGE[r.DEPTH]):
        dilation = r.RES5_DILATION if idx == 3 else 1
        first_stride = 1 if idx == 0 or dilation == 2 else 2
        stages.append(
            ResNet.make_stage(
                Bottle2neckBlock,
                n,
                in_channels=in_channels,
                out_channels=out_channels,
                stride_per_block=[first_stride] + [1] * (n - 1),
                first_in_stage_per_block=[True] + [False] * (n - 1),
                width=widths[idx],
                scales=scales,
                norm=norm,
                dilation=dilation,
                deform=bool(deform_on_per_stage[idx]),
                deform_modulated=r.DEFORM_MODULATED,
                deform_num_groups=r.DEFORM_NUM_GROUPS,
            )
        )
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_gfocal_res2net_fpn_backbone(cfg, input_shape: ShapeSpec):
    """Res2Net v1d bottom-up + the GFocal FPN (P3-P5 from res3-res5, P6/P7 from the P5 output)."""
    from .fpn import build_gfocal_fpn

    return build_gfocal_fpn(cfg, build_gfocal_res2net_backbone(cfg, input_shape))
