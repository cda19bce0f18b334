"""FPN with the reference's P6/P7: from the P5 *output*, no ReLU between P6 and P7.

Detectron2's RetinaNet FPN instead takes P6 from C5 and applies a ReLU before P7;
the authors' GFocal (MMDetection ``add_extra_convs='on_output'``,
``relu_before_extra_convs=False``) does not.

Only the pyramid levels the detector's head reads are built (see :func:`head_in_features`):
a level that is computed but not read would leave its convolutions without a gradient,
which DistributedDataParallel refuses ("parameters that were not used in producing loss").
The parameter names do not depend on which levels are built (``backbone.top_block.p6/p7``,
``backbone.fpn_lateral<k>/fpn_output<k>``), so the full P3-P7 model keeps its names.

Initialization is the reference's (MMDetection's FPN: ``xavier_init(distribution='uniform')``):
every lateral, output and P6/P7 conv gets ``nn.init.xavier_uniform_`` (gain 1) and a zero bias,
where Detectron2's FPN uses ``c2_xavier_fill`` (``kaiming_uniform_(a=1)``, bound sqrt(3 / fan_in)
instead of sqrt(6 / (fan_in + fan_out)): the same for the 3x3 convs of C -> C channels, not for
the laterals).
"""

import math
from typing import List, Optional

from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from torch import nn

from .resnet import build_gfocal_resnet_backbone

__all__ = [
    "HEAD_IN_FEATURES_KEYS",
    "LastLevelP6P7FromP5",
    "build_gfocal_fpn",
    "build_gfocal_resnet_fpn_backbone",
    "head_in_features",
    "unread_fpn_modules",
    "unread_level_parameters",
    "xavier_uniform_init",
    "xavier_init_fpn_convs",
]

#: Where each meta-architecture that can use these backbones reads its head's input levels.
#: Other meta-architectures get every level (P3-P7).
HEAD_IN_FEATURES_KEYS = {
    "GFocalV2": "MODEL.GFOCAL.IN_FEATURES",
    "RetinaNet": "MODEL.RETINANET.IN_FEATURES",
    # gfocalv2/modeling/baselines.py: Detectron2's FCOS built from the MODEL.RETINANET keys.
    "D2FCOS": "MODEL.RETINANET.IN_FEATURES",
    # A yacs FCOS (not in Detectron2 0.6) would read its own node, when the config has it.
    "FCOS": "MODEL.FCOS.IN_FEATURES",
}


def xavier_uniform_init(conv: nn.Module) -> None:
    """The reference's ``xavier_init(conv, distribution='uniform')``: weight ~ U(-b, b) with
    b = sqrt(6 / (fan_in + fan_out)) (gain 1), bias (if any) 0."""
    nn.init.xavier_uniform_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def xavier_init_fpn_convs(fpn: FPN) -> FPN:
    """Re-initialize the lateral and output convs of a Detectron2 ``FPN`` (which its constructor
    fills with ``c2_xavier_fill``) with :func:`xavier_uniform_init`, in the constructor's order
    (finest level first, lateral before output); norms and the top block are left as they are.
    Returns ``fpn``."""
    for lateral, output in zip(reversed(fpn.lateral_convs), reversed(fpn.output_convs)):
        xavier_uniform_init(lateral)
        xavier_uniform_init(output)
    return fpn


def head_in_features(cfg) -> Optional[List[str]]:
    """The backbone levels the head of ``cfg.MODEL.META_ARCHITECTURE`` reads, or None when
    unknown (a meta-architecture not in :data:`HEAD_IN_FEATURES_KEYS`, or its key is absent)."""
    key = HEAD_IN_FEATURES_KEYS.get(cfg.MODEL.META_ARCHITECTURE)
    if key is None:
        return None
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return list(node)


class LastLevelP6P7FromP5(nn.Module):
    """P6 = conv3x3/2(P5), P7 = conv3x3/2(P6), with no activation in between.

    Input: P5 of shape (N, C, H, W); outputs [P6 (N, C, H/2, W/2), P7 (N, C, H/4, W/4)].
    With ``num_levels=1`` only P6 is built and returned (no ``p7`` module).
    The convs are initialized as the reference's: :func:`xavier_uniform_init`.
    """

    def __init__(self, channels: int, in_feature: str = "p5", num_levels: int = 2):
        super().__init__()
        if num_levels not in (1, 2):
            raise ValueError(
                f"LastLevelP6P7FromP5 builds 1 (P6) or 2 (P6, P7) levels, not {num_levels}"
            )
        self.num_levels = num_levels
        self.in_feature = in_feature
        # Same creation and initialization order as always (both convs created, then p6 and p7
        # initialized), so that the full P6/P7 block draws its random numbers in a fixed order.
        self.p6 = nn.Conv2d(channels, channels, 3, 2, 1)
        if num_levels == 2:
            self.p7 = nn.Conv2d(channels, channels, 3, 2, 1)
        for module in (self.p6, getattr(self, "p7", None)):
            if module is not None:
                xavier_uniform_init(module)

    def forward(self, p5):
        p6 = self.p6(p5)
        if self.num_levels == 1:
            return [p6]
        p7 = self.p7(p6)
        return [p6, p7]


def _level(name: str) -> Optional[int]:
    """``"p5"`` -> 5; None for names that are not pyramid levels."""
    if len(name) > 1 and name[0] == "p" and name[1:].isdigit():
        return int(name[1:])
    return None


def build_gfocal_fpn(cfg, bottom_up):
    """Detectron2 FPN over ``MODEL.FPN.IN_FEATURES`` of ``bottom_up``, plus P6/P7 from P5,
    restricted to the levels the head reads (:func:`head_in_features`).

    With the inputs res3..res5, the output features are p3..p7 (strides 8..128) when the head
    reads p3..p7 (or when the meta-architecture is unknown). A head on p3..p5 gets no P6/P7
    block, one on p3..p6 gets P6 only; FPN inputs finer than the finest level read are left
    out (a head on p4..p7 gets no res3 lateral/output convs). The levels in between are
    always built: the top-down path and the P6/P7 block need them.

    All FPN convs (lateral, output, P6/P7) are xavier-uniform with zero bias, as the reference's
    (:func:`xavier_init_fpn_convs`, :class:`LastLevelP6P7FromP5`).
    """
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    shapes = bottom_up.output_shape()
    missing = [f for f in in_features if f not in shapes]
    if missing:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES {in_features}: {missing} not produced by the bottom-up "
            f"backbone, which outputs {sorted(shapes)}"
        )
    fpn_levels = [int(math.log2(shapes[f].stride)) for f in in_features]  # "res5" (stride 32) -> 5
    last = fpn_levels[-1]
    num_top = 2
    read = head_in_features(cfg)
    if read is not None:
        read_levels = [lv for lv in (_level(f) for f in read) if lv is not None]
        num_top = 2 if last + 2 in read_levels else 1 if last + 1 in read_levels else 0
        finest = min([lv for lv in read_levels if lv >= fpn_levels[0]] or [last])
        in_features = [f for f, lv in zip(in_features, fpn_levels) if lv >= finest] or in_features[
            -1:
        ]
    top_block = None
    if num_top:
        top_block = LastLevelP6P7FromP5(out_channels, in_feature=f"p{last}", num_levels=num_top)
    fpn = FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
    return xavier_init_fpn_convs(fpn)  # the reference's init, not Detectron2's c2_xavier_fill


@BACKBONE_REGISTRY.register()
def build_gfocal_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet (plain, ResNeXt or deformable, per ``MODEL.RESNETS.*``) + FPN + P6/P7 from P5
    (the levels the head reads; see :func:`build_gfocal_fpn`)."""
    return build_gfocal_fpn(cfg, build_gfocal_resnet_backbone(cfg, input_shape))


#: Top blocks whose levels are chained (P7 is computed from P6 only, and so on): a level after
#: the last one read is then computed by its own module alone.
_CHAINED_TOP_BLOCKS = (LastLevelP6P7FromP5, LastLevelP6P7)


def unread_fpn_modules(backbone: nn.Module, head_in_features: List[str]) -> Optional[List[str]]:
    """Names (within ``backbone``) of the submodules of a Detectron2 ``FPN`` that only compute
    levels the head does not read, or None when the backbone's structure is not known.

    A structural check, no forward pass: it relies on ``FPN.forward`` (the output conv of
    ``p<k>`` feeds only ``p<k>`` and the top block reading it; the lateral conv of ``p<k>``
    feeds ``p<k>`` and every finer level; the top block feeds only its own levels), so it
    answers only for ``FPN`` instances that keep that ``forward``. Other backbones (a user's
    own class) cannot be checked without running them, and get None.
    """
    if not isinstance(backbone, FPN) or type(backbone).forward is not FPN.forward:
        return None
    read = set(head_in_features)
    outputs = list(backbone._out_features)
    fpn_outputs, top_outputs = (
        outputs[: len(backbone.in_features)],
        outputs[len(backbone.in_features) :],
    )
    unread = []
    top = backbone.top_block
    top_read = top is not None and any(f in read for f in top_outputs)
    if top is not None and not top_read:
        unread.append("top_block")
    elif top is not None and isinstance(top, _CHAINED_TOP_BLOCKS):
        last_read = max(i for i, f in enumerate(top_outputs) if f in read)
        unread += [
            f"top_block.{f}"
            for f in top_outputs[last_read + 1 :]
            if isinstance(getattr(top, f, None), nn.Module)
        ]
    top_input = top.in_feature if top_read else None
    output_used = [f in read or f == top_input for f in fpn_outputs]
    for i, f in enumerate(fpn_outputs):
        stage = f[1:]  # "p3" -> "3", as FPN names its convs
        if not output_used[i]:
            unread.append(f"fpn_output{stage}")
        if not any(output_used[: i + 1]):
            unread.append(f"fpn_lateral{stage}")
    return unread


def unread_level_parameters(
    model: nn.Module, backbone_name: str, backbone: nn.Module, head_in_features: List[str]
):
    """(unread levels, names of trainable parameters in ``model`` that only they use) for an
    FPN backbone (see :func:`unread_fpn_modules`); ([], []) when nothing is unused or the
    backbone's structure is unknown. A parameter shared with a used module does not count."""
    modules = unread_fpn_modules(backbone, head_in_features)
    if not modules:
        return [], []
    prefixes = tuple(f"{backbone_name}.{m}" for m in modules)

    def unread(name):
        return any(name.startswith(p + ".") for p in prefixes)

    params = list(model.named_parameters(remove_duplicate=False))
    used = {id(p) for n, p in params if not unread(n)}
    names = [n for n, p in params if p.requires_grad and unread(n) and id(p) not in used]
    levels = [f for f in backbone.output_shape() if f not in set(head_in_features)]
    return levels, names
