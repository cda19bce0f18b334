r"""Convert published weights into Detectron2 checkpoints for gfocalv2.

Two sources::

    python -m gfocalv2.convert mmdet    SRC.pth DST.pth [--arch r101] [--config-file CFG.yaml] \
        [--num-classes 80]
    python -m gfocalv2.convert imagenet SRC.pth DST.pth [--arch r50|r101|x101-32x4d|res2net101]

``mmdet``
    The authors' released GFocalV2 / GFL checkpoints: MMDetection 2.x files
    ``{"state_dict": ..., "meta": ...}`` with keys ``backbone.*`` (ResNet, ResNeXt,
    optionally with DCN ``conv2.conv_offset``, or Res2Net), ``neck.lateral_convs.i.conv.*``,
    ``neck.fpn_convs.i.conv.*``, ``bbox_head.{cls,reg}_convs.i.{conv,gn}.*``,
    ``bbox_head.gfl_cls``, ``bbox_head.gfl_reg``, ``bbox_head.scales.i.scale`` and, for
    GFLV2, ``bbox_head.reg_conf.{0,2}``. The result is a full Detectron2 checkpoint for
    the ``GFocalV2`` meta-architecture (``backbone.bottom_up.*``, ``backbone.fpn_*``,
    ``backbone.top_block.p6/p7``, ``head.*``). The released classifier has C + 1 output
    channels (``QualityFocalLoss(use_sigmoid=False)``: an extra background channel at
    the end, trained to 0); the last channel is dropped.

``imagenet``
    ImageNet classification weights: torchvision ResNet / ResNeXt state dicts, the
    open-mmlab ``resnext101_32x4d`` release (same naming) and the Res2Net v1d release
    (MMDetection naming ``stem.{0,1,3,4,6,7}`` or the original ``conv1.{0,1,3,4,6}`` +
    ``bn1``). The result holds the backbone only, under ``backbone.bottom_up.``;
    ``MODEL.WEIGHTS`` can point to it to start training.

Every source key is either converted or reported (with the reason it was dropped);
every parameter and buffer of the target model is either filled or reported; a
shape mismatch is an error naming both keys. The target model is built from
``--config-file`` if given, otherwise from the architecture found in the source
(depth, ResNeXt groups, deformable stages, number of classes, reg_max, DGQP).
"""

import argparse
import logging
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

logger = logging.getLogger("gfocalv2.convert")

__all__ = [
    "ConversionError",
    "ConversionReport",
    "ARCHS",
    "load_source",
    "detect_backbone",
    "rename_backbone_key",
    "convert_mmdet",
    "convert_imagenet",
    "check_against_model",
    "build_target_cfg",
    "convert_file",
    "main",
]

#: --arch choices: (family, depth, num_groups, width_per_group).
ARCHS = {
    "r18": ("resnet", 18, 1, 64),
    "r34": ("resnet", 34, 1, 64),
    "r50": ("resnet", 50, 1, 64),
    "r101": ("resnet", 101, 1, 64),
    "r152": ("resnet", 152, 1, 64),
    "x101-32x4d": ("resnet", 101, 32, 4),
    "x101-32x8d": ("resnet", 101, 32, 8),
    "x101-64x4d": ("resnet", 101, 64, 4),
    "res2net50": ("res2net", 50, 1, 26),
    "res2net101": ("res2net", 101, 1, 26),
    "res2net152": ("res2net", 152, 1, 26),
}

_BLOCKS_TO_DEPTH = {
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
    ("bottleneck", (3, 8, 36, 3)): 152,
}

# Buffers of the target model that a checkpoint need not fill.
_TARGET_OPTIONAL = (
    re.compile(r".*num_batches_tracked$"),  # BatchNorm's step counter (unused: momentum is set)
    re.compile(r"^pixel_(mean|std)$"),  # set from the config
    re.compile(r".*anchor_generator\.cell_anchors.*"),  # recomputed from the config
)


class ConversionError(ValueError):
    """A source that cannot be converted (shape mismatch, unknown keys when strict, wrong arch)."""


@dataclass
class ConversionReport:
    """What happened to every key.

    converted: (source key, target key) pairs.
    dropped: (source key, reason) for source keys deliberately not converted.
    unmatched: source keys no rule understands.
    missing: target model keys no source key filled (optional buffers excluded).
    unexpected: converted keys that the target model does not have.
    notes: other messages (e.g. the classifier's dropped background channel).
    """

    converted: List[Tuple[str, str]] = field(default_factory=list)
    dropped: List[Tuple[str, str]] = field(default_factory=list)
    unmatched: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def log(self, log=logger):
        log.info("converted %d tensors", len(self.converted))
        for src, reason in self.dropped:
            log.info("dropped %s: %s", src, reason)
        for note in self.notes:
            log.info("%s", note)
        for k in self.unmatched:
            log.warning("source key not converted (no rule matches it): %s", k)
        for k in self.unexpected:
            log.warning("converted key not in the target model: %s", k)
        for k in self.missing:
            log.warning("target model key not filled by the source: %s", k)

    @property
    def problems(self) -> List[str]:
        return (
            [f"unmatched source key {k}" for k in self.unmatched]
            + [f"converted key {k} not in the target model" for k in self.unexpected]
            + [f"target model key {k} not filled" for k in self.missing]
        )


# --------------------------------------------------------------------------- loading


def load_source(path: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Read a checkpoint file; return (state dict of tensors, meta dict).

    Accepts a bare state dict, ``{"state_dict": ..., "meta": ...}`` (MMCV) and
    ``{"model": ...}`` (Detectron2 / others). A ``module.`` prefix (DataParallel) is removed.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (old MMCV files pickle a few non-tensor objects in "meta")
        logger.warning(
            "%s does not load with weights_only=True (%s); loading it as a full pickle. "
            "Only do this with files from a source you trust.",
            path,
            type(e).__name__,
        )
        obj = torch.load(path, map_location="cpu", weights_only=False)
    meta = {}
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        meta = obj.get("meta") or {}
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: no state dict found (got {type(obj).__name__})")
    state = OrderedDict()
    for k, v in obj.items():
        if k.startswith("module."):
            k = k[len("module.") :]
        if not isinstance(v, torch.Tensor):
            try:
                import numpy as np

                if isinstance(v, np.ndarray):
                    v = torch.from_numpy(v)
            except ImportError:
                pass
        if not isinstance(v, torch.Tensor):
            raise ConversionError(f"{path}: value of key {k} is a {type(v).__name__}, not a tensor")
        state[k] = v
    return state, meta if isinstance(meta, dict) else {}


# --------------------------------------------------------------------------- backbone


@dataclass
class BackboneInfo:
    """Architecture found in a backbone state dict (keys without the ``backbone.`` prefix)."""

    family: str  # "resnet" or "res2net"
    depth: int
    num_groups: int = 1
    width_per_group: int = 64  # ResNeXt width per group, or Res2Net base width
    scales: int = 1  # Res2Net splits
    deform_on_per_stage: Tuple[bool, bool, bool, bool] = (False, False, False, False)
    deform_modulated: bool = False
    deform_num_groups: int = 1

    @property
    def arch(self) -> str:
        if self.family == "res2net":
            return f"res2net{self.depth}"
        if self.num_groups > 1:
            return f"x{self.depth}-{self.num_groups}x{self.width_per_group}d"
        return f"r{self.depth}"


def detect_backbone(state: Dict[str, torch.Tensor]) -> BackboneInfo:
    """Infer the backbone of a (torchvision / MMDetection / Res2Net) state dict without prefix."""
    blocks = {}
    for k in state:
        m = re.match(r"layer([1-4])\.(\d+)\.", k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if sorted(blocks) != [1, 2, 3, 4]:
        raise ConversionError("no ResNet-like backbone found: expected keys layer1.* .. layer4.*")
    counts = tuple(max(blocks[i]) + 1 for i in (1, 2, 3, 4))
    res2net = any(".convs.0." in k for k in state)
    kind = "bottleneck" if (res2net or "layer1.0.conv3.weight" in state) else "basic"
    depth = _BLOCKS_TO_DEPTH.get((kind, counts))
    if depth is None:
        raise ConversionError(f"unknown ResNet depth: {kind} blocks per stage {counts}")
    info = BackboneInfo(family="res2net" if res2net else "resnet", depth=depth)
    if res2net:
        w = state["layer1.0.convs.0.weight"]
        info.width_per_group = w.shape[0]
        info.scales = state["layer1.0.conv1.weight"].shape[0] // w.shape[0]
        offset_fmt = "layer{}.0.convs.0.conv_offset.weight"
    elif kind == "bottleneck":
        w = state["layer1.0.conv2.weight"]
        info.num_groups = w.shape[0] // w.shape[1]
        info.width_per_group = w.shape[0] // info.num_groups
        offset_fmt = "layer{}.0.conv2.conv_offset.weight"
    else:
        offset_fmt = "layer{}.0.conv2.conv_offset.weight"
    deform = []
    for i in (1, 2, 3, 4):
        off = state.get(offset_fmt.format(i))
        deform.append(off is not None)
        if off is not None:
            if off.shape[0] % 27 == 0 and off.shape[0] % 18 != 0:
                info.deform_modulated, info.deform_num_groups = True, off.shape[0] // 27
            elif off.shape[0] % 18 == 0:
                info.deform_modulated, info.deform_num_groups = False, off.shape[0] // 18
            else:
                raise ConversionError(
                    f"{offset_fmt.format(i)}: {off.shape[0]} offset channels, "
                    "expected 18 x G or 27 x G"
                )
    info.deform_on_per_stage = tuple(deform)
    return info


def _stage(k: str) -> str:
    return str(int(k) + 1)


def rename_backbone_key(key: str, family: str) -> Optional[str]:
    """Detectron2 bottom-up name (without prefix) of a torchvision/MMDetection/Res2Net backbone key.

    Returns None if no rule applies. ``num_batches_tracked`` and ``fc.*`` are handled by callers.
    """
    m = re.match(r"^layer(\d)\.(\d+)\.(.+)$", key)
    if m:
        res, blk, rest = f"res{_stage(m.group(1))}", m.group(2), m.group(3)
        p = f"{res}.{blk}."
        rules = [
            (r"^conv([13])\.weight$", lambda r: f"conv{r.group(1)}.weight"),
            (r"^bn([13])\.(.+)$", lambda r: f"conv{r.group(1)}.norm.{r.group(2)}"),
        ]
        if family == "res2net":
            rules += [
                (r"^convs\.(\d+)\.weight$", lambda r: f"conv2.{r.group(1)}.weight"),
                (
                    r"^convs\.(\d+)\.conv_offset\.(weight|bias)$",
                    lambda r: f"conv2_offset.{r.group(1)}.{r.group(2)}",
                ),
                (r"^bns\.(\d+)\.(.+)$", lambda r: f"conv2.{r.group(1)}.norm.{r.group(2)}"),
                (r"^downsample\.1\.weight$", lambda r: "shortcut.weight"),
                (r"^downsample\.2\.(.+)$", lambda r: f"shortcut.norm.{r.group(1)}"),
            ]
        else:
            rules += [
                (r"^conv2\.weight$", lambda r: "conv2.weight"),
                (r"^bn2\.(.+)$", lambda r: f"conv2.norm.{r.group(1)}"),
                (r"^conv2\.conv_offset\.(weight|bias)$", lambda r: f"conv2_offset.{r.group(1)}"),
                (r"^downsample\.0\.weight$", lambda r: "shortcut.weight"),
                (r"^downsample\.1\.(.+)$", lambda r: f"shortcut.norm.{r.group(1)}"),
            ]
        for pat, fn in rules:
            r = re.match(pat, rest)
            if r:
                return p + fn(r)
        return None
    if family == "res2net":
        # MMDetection deep stem: stem.{0,3,6} convs, stem.{1,4,7} norms.
        r = re.match(r"^stem\.([0-9])\.(.+)$", key)
        if r:
            idx, rest = int(r.group(1)), r.group(2)
            if idx in (0, 3, 6) and rest == "weight":
                return f"stem.conv{idx // 3 + 1}.weight"
            if idx in (1, 4, 7):
                return f"stem.conv{idx // 3 + 1}.norm.{rest}"
            return None
        # Original Res2Net release: conv1.{0,3,6} convs, conv1.{1,4} norms, bn1 the last norm.
        r = re.match(r"^conv1\.([0-9])\.(.+)$", key)
        if r:
            idx, rest = int(r.group(1)), r.group(2)
            if idx in (0, 3, 6) and rest == "weight":
                return f"stem.conv{idx // 3 + 1}.weight"
            if idx in (1, 4):
                return f"stem.conv{idx // 3 + 1}.norm.{rest}"
            return None
        r = re.match(r"^bn1\.(.+)$", key)
        if r:
            return f"stem.conv3.norm.{r.group(1)}"
        return None
    if key == "conv1.weight":
        return "stem.conv1.weight"
    r = re.match(r"^bn1\.(.+)$", key)
    if r:
        return f"stem.conv1.norm.{r.group(1)}"
    return None


def _convert_backbone(state, family, prefix_out, report, out):
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            report.dropped.append((k, "BatchNorm step counter, not used"))
            continue
        if re.match(r"^(fc|classifier|head)\.", k):
            report.dropped.append((k, "ImageNet classifier, not part of the detector"))
            continue
        new = rename_backbone_key(k, family)
        if new is None:
            report.unmatched.append(k)
            continue
        out[prefix_out + new] = v
        report.converted.append((k, prefix_out + new))


def _strip_prefix(state, prefix):
    return OrderedDict((k[len(prefix) :], v) for k, v in state.items() if k.startswith(prefix))


def convert_imagenet(state: Dict[str, torch.Tensor], family: Optional[str] = None):
    """ImageNet classification weights -> ``{backbone.bottom_up.*: tensor}``;
    returns (dict, report)."""
    if state and all(k.startswith("backbone.") for k in state):
        state = _strip_prefix(state, "backbone.")
    family = family or detect_backbone(state).family
    report = ConversionReport()
    out = OrderedDict()
    _convert_backbone(state, family, "backbone.bottom_up.", report, out)
    return out, report


# --------------------------------------------------------------------------- detector


def convert_mmdet(
    state: Dict[str, torch.Tensor],
    num_classes: int,
    family: Optional[str] = None,
    fpn_levels: Tuple[int, ...] = (3, 4, 5),
):
    """MMDetection GFocalV2 / GFL state dict -> Detectron2 GFocalV2 state dict;
    returns (dict, report).

    Args:
        num_classes: C of the target model; a ``gfl_cls`` with C + 1 outputs loses its last
            (background) channel, one with C outputs is kept, anything else is an error.
        fpn_levels: pyramid levels of the FPN inputs (``neck.lateral_convs.i`` -> level
            ``fpn_levels[i]``); ``neck.fpn_convs`` beyond them are P6 and P7.
    """
    report = ConversionReport()
    out = OrderedDict()
    backbone = _strip_prefix(state, "backbone.")
    family = family or detect_backbone(backbone).family
    _convert_backbone(backbone, family, "backbone.bottom_up.", report, out)
    # In a detector the backbone has no classifier: a "fc.*" key is not expected.
    for k, reason in list(report.dropped):
        if reason.startswith("ImageNet classifier"):
            report.dropped.remove((k, reason))
            report.unmatched.append("backbone." + k)
    report.converted = [("backbone." + s, t) for s, t in report.converted]
    report.dropped = [("backbone." + s, r) for s, r in report.dropped]
    report.unmatched = [
        k if k.startswith("backbone.") else "backbone." + k for k in report.unmatched
    ]

    n_in = len(fpn_levels)
    top = {n_in: "top_block.p6", n_in + 1: "top_block.p7"}
    for k, v in state.items():
        if k.startswith("backbone."):
            continue
        new = None
        m = re.match(r"^neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)$", k)
        if m and int(m.group(1)) < n_in:
            new = f"backbone.fpn_lateral{fpn_levels[int(m.group(1))]}.{m.group(2)}"
        m2 = re.match(r"^neck\.fpn_convs\.(\d+)\.conv\.(weight|bias)$", k)
        if m2:
            i = int(m2.group(1))
            if i < n_in:
                new = f"backbone.fpn_output{fpn_levels[i]}.{m2.group(2)}"
            elif i in top:
                new = f"backbone.{top[i]}.{m2.group(2)}"
        m3 = re.match(r"^bbox_head\.(cls|reg)_convs\.(\d+)\.(conv|gn)\.(weight|bias)$", k)
        if m3:
            tower = "cls_subnet" if m3.group(1) == "cls" else "bbox_subnet"
            i = int(m3.group(2))
            new = f"head.{tower}.{3 * i + (0 if m3.group(3) == 'conv' else 1)}.{m3.group(4)}"
        m4 = re.match(r"^bbox_head\.gfl_(cls|reg)\.(weight|bias)$", k)
        if m4:
            new = f"head.{'cls_score' if m4.group(1) == 'cls' else 'bbox_pred'}.{m4.group(2)}"
            if m4.group(1) == "cls":
                if v.shape[0] == num_classes + 1:
                    v = v[:num_classes].clone()
                    if m4.group(2) == "weight":
                        report.notes.append(
                            f"bbox_head.gfl_cls has {num_classes + 1} outputs: dropped the last "
                            "one (the background channel of QualityFocalLoss(use_sigmoid=False), "
                            f"trained to 0); kept {num_classes} classes"
                        )
                elif v.shape[0] != num_classes:
                    raise ConversionError(
                        f"{k}: {v.shape[0]} output channels, expected {num_classes} classes "
                        f"(or {num_classes + 1} with a background channel)"
                    )
        m5 = re.match(r"^bbox_head\.scales\.(\d+)\.scale$", k)
        if m5:
            new = f"head.scales.{m5.group(1)}.scale"
            v = v.reshape(())
        m6 = re.match(r"^bbox_head\.reg_conf\.([02])\.(weight|bias)$", k)
        if m6:
            new = f"head.dgqp.{m6.group(1)}.{m6.group(2)}"
        if k == "bbox_head.integral.project":
            expect = torch.linspace(0, v.numel() - 1, v.numel())
            if not torch.allclose(v.float(), expect):
                raise ConversionError(f"{k} is not 0..reg_max: {v.tolist()}")
            report.dropped.append(
                (k, "the constant 0..reg_max projection of the Integral layer, recomputed")
            )
            continue
        if new is None:
            report.unmatched.append(k)
            continue
        out[new] = v
        report.converted.append((k, new))
    return out, report


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


# --------------------------------------------------------------------------- target model


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

    import gfocalv2  # noqa: F401

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


def _infer_head(state):
    """(num classes incl. a possible background channel, reg_max, dgqp tuple or None) of an
    mmdet state dict."""
    if "bbox_head.gfl_cls.weight" not in state or "bbox_head.gfl_reg.weight" not in state:
        raise ConversionError(
            "not a GFL/GFocalV2 checkpoint: bbox_head.gfl_cls / bbox_head.gfl_reg missing"
        )
    n_cls = state["bbox_head.gfl_cls.weight"].shape[0]
    n_reg = state["bbox_head.gfl_reg.weight"].shape[0]
    if n_reg % 4:
        raise ConversionError(f"bbox_head.gfl_reg.weight: {n_reg} outputs, not 4 x (reg_max + 1)")
    reg_max = n_reg // 4 - 1
    dgqp = None
    if "bbox_head.reg_conf.0.weight" in state:
        w0 = state["bbox_head.reg_conf.0.weight"]
        per_side = w0.shape[1] // 4
        # The authors' DGQP always uses add_mean=True (topk + 1 statistics per side).
        dgqp = (per_side - 1, True, w0.shape[0])
    return n_cls, reg_max, dgqp


def convert_file(
    kind: str,
    src: str,
    dst: str,
    *,
    arch=None,
    config_file=None,
    opts=(),
    num_classes=None,
    strict=True,
):
    """Convert ``src`` into the Detectron2 checkpoint ``dst``; returns the ConversionReport."""
    state, meta = load_source(src)
    if kind == "mmdet":
        backbone_state = _strip_prefix(state, "backbone.")
    else:
        backbone_state = (
            _strip_prefix(state, "backbone.")
            if state and all(k.startswith("backbone.") for k in state)
            else state
        )
    info = detect_backbone(backbone_state)
    logger.info("source backbone: %s (%s)", info.arch, info)
    if arch is not None:
        family, depth, groups, width = ARCHS[arch]
        found = (info.family, info.depth, info.num_groups, info.width_per_group)
        if found != (family, depth, groups, width):
            raise ConversionError(
                f"--arch {arch} does not match the source backbone, which is {info.arch} {found}"
            )
    detector = kind == "mmdet"
    if detector:
        n_cls, reg_max, dgqp = _infer_head(state)
        if num_classes is None and config_file is None:
            classes = meta.get("CLASSES") if isinstance(meta, dict) else None
            if classes:
                num_classes = len(classes)
            else:
                num_classes = n_cls - 1 if dgqp is not None else n_cls
                logger.info(
                    "no class list in the checkpoint's meta: assuming %d classes", num_classes
                )
        cfg = build_target_cfg(
            info,
            detector=True,
            num_classes=num_classes or 80,
            reg_max=reg_max,
            dgqp=dgqp,
            config_file=config_file,
            opts=opts,
        )
        if num_classes is not None:
            cfg.MODEL.GFOCAL.NUM_CLASSES = num_classes
        num_classes = cfg.MODEL.GFOCAL.NUM_CLASSES
        levels = tuple(int(f[-1]) for f in cfg.MODEL.FPN.IN_FEATURES)
        converted, report = convert_mmdet(state, num_classes, family=info.family, fpn_levels=levels)
    else:
        cfg = build_target_cfg(info, detector=False, config_file=config_file, opts=opts)
        converted, report = convert_imagenet(backbone_state, family=info.family)
    target = build_target_state(cfg, detector)
    check_against_model(converted, target, report)
    if not detector:
        # Deformable offsets are not part of ImageNet weights: they start at zero (their init).
        offsets = [k for k in report.missing if ".conv2_offset" in k]
        if offsets:
            report.missing = [k for k in report.missing if k not in offsets]
            report.notes.append(
                f"{len(offsets)} deformable-offset tensors (conv2_offset) keep their zero init"
            )
    report.log()
    if strict and report.problems:
        raise ConversionError(
            f"{len(report.problems)} problem(s) converting {src} (use --no-strict to write "
            "anyway):\n  " + "\n  ".join(report.problems)
        )
    torch.save(
        {
            "model": converted,
            "__author__": f"gfocalv2.convert {kind} from {src}",
            "matching_heuristics": False,
        },
        dst,
    )
    logger.info("wrote %s (%d tensors)", dst, len(converted))
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m gfocalv2.convert",
        description="Convert the authors' MMDetection GFocalV2/GFL checkpoints or ImageNet weights "
        "into Detectron2 checkpoints.",
    )
    parser.add_argument(
        "kind",
        choices=["mmdet", "imagenet"],
        help="mmdet: a released detector; imagenet: classification weights",
    )
    parser.add_argument("src", help="source .pth")
    parser.add_argument("dst", help="output .pth (Detectron2 checkpoint, for MODEL.WEIGHTS)")
    parser.add_argument(
        "--arch",
        choices=sorted(ARCHS),
        help="expected backbone (checked against the source; detected if omitted)",
    )
    parser.add_argument(
        "--config-file",
        default=None,
        help="build the target model from this config instead of the detected architecture",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes of the target model (mmdet; default: the length of meta CLASSES, else "
        "gfl_cls outputs minus the background channel of GFLV2)",
    )
    parser.add_argument(
        "--no-strict",
        action="store_true",
        help="write the output even if keys were unmatched or missing",
    )
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="config overrides (KEY VALUE ...), with --config-file",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        convert_file(
            args.kind,
            args.src,
            args.dst,
            arch=args.arch,
            config_file=args.config_file,
            opts=args.opts,
            num_classes=args.num_classes,
            strict=not args.no_strict,
        )
    except ConversionError as e:
        logger.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
