"""Detectron2 ResNet / ResNeXt with deformable 3x3 convs that need no compiled ops.

Detectron2's own ``DeformBottleneckBlock`` uses ``detectron2.layers.DeformConv``,
a compiled (C++/CUDA) op that the registries' pure-Python Detectron2 lacks. This
module builds the same network from Detectron2's classes (``ResNet``,
``BasicStem``, ``BottleneckBlock``, ``BasicBlock``, ``ResNet.make_stage``) and
swaps in :class:`DeformBottleneckBlock`, whose deformable conv is
``torchvision.ops.deform_conv2d`` (CPU and CUDA, autograd, AMP).

Module and parameter names are Detectron2's (``stem.conv1``, ``res3.0.conv2``,
``res3.0.conv2.norm``, ``res3.0.conv2_offset``, ``res3.0.shortcut`` ...), so
checkpoints written for Detectron2's deformable ResNet load unchanged.

Normalization (``MODEL.RESNETS.NORM``): everything Detectron2's ``get_norm``
accepts ("FrozenBN", "BN", "SyncBN", "GN", ...) keeps its Detectron2 meaning, plus

* ``"BNEval"``: MMDetection's ``norm_eval=True, requires_grad=True``, which the
  reference trains with: BatchNorm whose statistics stay frozen (always the
  running statistics, never updated, in train and eval mode) while its affine
  weight and bias train. Stages frozen by ``MODEL.BACKBONE.FREEZE_AT`` become
  ``FrozenBatchNorm2d`` as usual (statistics and affine frozen).
"""

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.layers import CNNBlockBase, Conv2d, get_norm
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet
from torch import nn
from torchvision.ops import deform_conv2d

__all__ = [
    "EvalBatchNorm2d",
    "resolve_norm",
    "DeformConv2d",
    "DeformBottleneckBlock",
    "build_gfocal_resnet_backbone",
    "NUM_BLOCKS_PER_STAGE",
]

NUM_BLOCKS_PER_STAGE = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
}


class EvalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that always normalizes with its running statistics and never updates them.

    The affine ``weight`` and ``bias`` remain trainable parameters (MMDetection's
    ``norm_eval=True`` with ``requires_grad=True``). It is a ``nn.BatchNorm2d``, so
    Detectron2 treats it as a norm layer (weight decay of norms, conversion to
    ``FrozenBatchNorm2d`` when a stage is frozen), and its state dict keys are BatchNorm's.

    Input and output: (N, C, H, W).
    """

    def forward(self, x):
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


#: Norm names added on top of Detectron2's ``get_norm`` names.
EXTRA_NORMS = {"BNEval": EvalBatchNorm2d}


def resolve_norm(norm):
    """Map a norm name to what ``detectron2.layers.get_norm`` accepts.

    "BNEval" becomes :class:`EvalBatchNorm2d`; any other value (a Detectron2 norm name,
    "" or a callable) is returned unchanged.
    """
    if isinstance(norm, str) and norm in EXTRA_NORMS:
        return EXTRA_NORMS[norm]
    return norm


class DeformConv2d(nn.Module):
    """Deformable convolution (DCNv1, or DCNv2 when given a mask) on
    ``torchvision.ops.deform_conv2d``.

    Drop-in for ``detectron2.layers.DeformConv`` / ``ModulatedDeformConv``: same
    parameters (``weight`` of shape (C_out, C_in / groups, k, k), optional ``bias``),
    optional ``norm`` and ``activation`` applied after the convolution, and the same
    offset layout (MMCV's and Detectron2's): for deform group g and kernel tap
    t = i * k + j, channel 2 * (g * k * k + t) is the vertical and 2 * (g * k * k + t) + 1
    the horizontal offset, in input pixels.

    forward(x, offset, mask=None):
        x: (N, C_in, H, W); offset: (N, 2 * G * k * k, H_out, W_out);
        mask: None (DCNv1) or (N, G * k * k, H_out, W_out) (DCNv2, already in [0, 1]).
        Returns (N, C_out, H_out, W_out).
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size=3,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        deformable_groups=1,
        bias=False,
        norm=None,
        activation=None,
    ):
        super().__init__()
        assert in_channels % groups == 0 and out_channels % groups == 0, (
            in_channels,
            out_channels,
            groups,
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (
            (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        )
        self.stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
        self.padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
        self.dilation = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
        self.groups = groups
        self.deformable_groups = deformable_groups
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.norm = norm
        self.activation = activation
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def forward(self, x, offset, mask=None):
        k = self.kernel_size[0] * self.kernel_size[1]
        if offset.shape[1] != 2 * self.deformable_groups * k:
            raise ValueError(
                f"offset has {offset.shape[1]} channels, expected 2 x {self.deformable_groups} "
                f"deform group(s) x {k} taps = {2 * self.deformable_groups * k}"
            )
        if mask is not None and mask.shape[1] != self.deformable_groups * k:
            raise ValueError(
                f"mask has {mask.shape[1]} channels, expected {self.deformable_groups * k}"
            )
        # torchvision's kernels lack bfloat16 (CPU and CUDA) and half on CPU, and its autocast
        # rule runs the op in float32 anyway: compute low-precision inputs in float32 and
        # return the input's dtype.
        dtype = x.dtype
        compute = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = deform_conv2d(
                x.to(compute),
                offset.to(compute),
                self.weight.to(compute),
                None if self.bias is None else self.bias.to(compute),
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
                mask=None if mask is None else mask.to(compute),
            )
        out = out.to(dtype)
        if self.norm is not None:
            out = self.norm(out)
        if self.activation is not None:
            out = self.activation(out)
        return out

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, deformable_groups={self.deformable_groups}, "
            f"bias={self.bias is not None}"
        )


class DeformBottleneckBlock(CNNBlockBase):
    """Bottleneck (1x1, deformable 3x3, 1x1) with a projection shortcut if needed.

    Same structure and parameter names as Detectron2's ``DeformBottleneckBlock``;
    the 3x3 conv is :class:`DeformConv2d` (torchvision). ``conv2_offset`` is a plain
    3x3 conv (with bias, zero-initialized, so the block starts as a regular
    bottleneck) predicting 18 x G offset channels (DCNv1) or 27 x G channels
    (DCNv2: 18 x G offsets followed by 9 x G mask logits, mask = sigmoid(logits)).

    Input (N, C_in, H, W) -> output (N, C_out, H / stride, W / stride).
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        *,
        bottleneck_channels,
        stride=1,
        num_groups=1,
        norm="BN",
        stride_in_1x1=False,
        dilation=1,
        deform_modulated=False,
        deform_num_groups=1,
    ):
        super().__init__(in_channels, out_channels, stride)
        self.deform_modulated = deform_modulated
        self.deform_num_groups = deform_num_groups

        if in_channels != out_channels:
            self.shortcut = Conv2d(
                in_channels,
                out_channels,
                kernel_size=1,
                stride=stride,
                bias=False,
                norm=get_norm(norm, out_channels),
            )
        else:
            self.shortcut = None

        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)

        self.conv1 = Conv2d(
            in_channels,
            bottleneck_channels,
            kernel_size=1,
            stride=stride_1x1,
            bias=False,
            norm=get_norm(norm, bottleneck_channels),
        )
        offset_channels = (27 if deform_modulated else 18) * deform_num_groups
        self.conv2_offset = Conv2d(
            bottleneck_channels,
            offset_channels,
            kernel_size=3,
            stride=stride_3x3,
            padding=1 * dilation,
            dilation=dilation,
        )
        self.conv2 = DeformConv2d(
            bottleneck_channels,
            bottleneck_channels,
            kernel_size=3,
            stride=stride_3x3,
            padding=1 * dilation,
            bias=False,
            groups=num_groups,
            dilation=dilation,
            deformable_groups=deform_num_groups,
            norm=get_norm(norm, bottleneck_channels),
        )
        self.conv3 = Conv2d(
            bottleneck_channels,
            out_channels,
            kernel_size=1,
            bias=False,
            norm=get_norm(norm, out_channels),
        )

        for layer in [self.conv1, self.conv2, self.conv3, self.shortcut]:
            if layer is not None:  # shortcut can be None
                weight_init.c2_msra_fill(layer)
        nn.init.constant_(self.conv2_offset.weight, 0)
        nn.init.constant_(self.conv2_offset.bias, 0)

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        out = deform_conv_forward(self.conv2, self.conv2_offset, out, self.deform_modulated)
        out = F.relu_(out)
        out = self.conv3(out)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        out += shortcut
        return F.relu_(out)


def deform_conv_forward(conv, offset_conv, x, modulated):
    """Run ``conv`` (a :class:`DeformConv2d`) on ``x`` (N, C, H, W) with offsets (and mask)
    from ``offset_conv``.

    ``offset_conv(x)`` has 18 x G channels (offsets) or, if ``modulated``, 27 x G
    channels: the first 18 x G are the offsets, the last 9 x G the mask logits
    (MMCV's ``ModulatedDeformConv2dPack`` and Detectron2's layout).
    """
    offset = offset_conv(x)
    if not modulated:
        return conv(x, offset)
    n_off = offset.shape[1] // 3 * 2
    return conv(x, offset[:, :n_off], offset[:, n_off:].sigmoid())


def build_gfocal_resnet_backbone(cfg, input_shape):
    """Detectron2's ResNet from ``MODEL.RESNETS.*``, with deformable blocks that need no
    compiled ops.

    Reads the keys Detectron2's ``build_resnet_backbone`` reads, with the same meaning:
    DEPTH (18, 34, 50, 101, 152), NUM_GROUPS and WIDTH_PER_GROUP (ResNeXt), STRIDE_IN_1X1
    (False = pytorch style, the reference's), NORM (plus "BNEval", see the module doc),
    RES5_DILATION, STEM_OUT_CHANNELS, RES2_OUT_CHANNELS, OUT_FEATURES,
    DEFORM_ON_PER_STAGE (res2..res5), DEFORM_MODULATED (False: DCNv1, 18 offset channels;
    True: DCNv2, 27 offset+mask channels), DEFORM_NUM_GROUPS; and MODEL.BACKBONE.FREEZE_AT.

    Returns:
        detectron2.modeling.backbone.ResNet
    """
    r = cfg.MODEL.RESNETS
    norm = resolve_norm(r.NORM)
    stem = BasicStem(in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=norm)

    depth = r.DEPTH
    if depth not in NUM_BLOCKS_PER_STAGE:
        raise ValueError(
            f"MODEL.RESNETS.DEPTH must be one of {sorted(NUM_BLOCKS_PER_STAGE)}, got {depth}"
        )
    num_groups = r.NUM_GROUPS
    bottleneck_channels = num_groups * r.WIDTH_PER_GROUP
    in_channels = r.STEM_OUT_CHANNELS
    out_channels = r.RES2_OUT_CHANNELS
    res5_dilation = r.RES5_DILATION
    deform_on_per_stage = list(r.DEFORM_ON_PER_STAGE)
    if len(deform_on_per_stage) != 4:
        raise ValueError(
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE needs 4 entries (res2..res5), got "
            f"{deform_on_per_stage}"
        )
    if res5_dilation not in (1, 2):
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION must be 1 or 2, got {res5_dilation}")
    if depth in (18, 34):
        if out_channels != 64:
            raise ValueError("MODEL.RESNETS.RES2_OUT_CHANNELS must be 64 for R-18/R-34")
        if any(deform_on_per_stage):
            raise ValueError(
                "MODEL.RESNETS.DEFORM_ON_PER_STAGE is not supported for R-18/R-34 (basic blocks)"
            )
        if res5_dilation != 1:
            raise ValueError("MODEL.RESNETS.RES5_DILATION must be 1 for R-18/R-34")
        if num_groups != 1:
            raise ValueError("MODEL.RESNETS.NUM_GROUPS must be 1 for R-18/R-34")

    num_blocks_per_stage = NUM_BLOCKS_PER_STAGE[depth]
    stages = []
    for idx, stage_idx in enumerate(range(2, 6)):
        dilation = res5_dilation if stage_idx == 5 else 1
        first_stride = 1 if idx == 0 or (stage_idx == 5 and dilation == 2) else 2
        n = num_blocks_per_stage[idx]
        kwargs = {
            "num_blocks": n,
            "stride_per_block": [first_stride] + [1] * (n - 1),
            "in_channels": in_channels,
            "out_channels": out_channels,
            "norm": norm,
        }
        if depth in (18, 34):
            kwargs["block_class"] = BasicBlock
        else:
            kwargs.update(
                bottleneck_channels=bottleneck_channels,
                stride_in_1x1=r.STRIDE_IN_1X1,
                dilation=dilation,
                num_groups=num_groups,
            )
            if deform_on_per_stage[idx]:
                kwargs.update(
                    block_class=DeformBottleneckBlock,
                    deform_modulated=r.DEFORM_MODULATED,
                    deform_num_groups=r.DEFORM_NUM_GROUPS,
                )
            else:
                kwargs["block_class"] = BottleneckBlock
        stages.append(ResNet.make_stage(**kwargs))
        in_channels = out_channels
        out_channels *= 2
        bottleneck_channels *= 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
