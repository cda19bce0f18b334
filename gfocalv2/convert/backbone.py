"""The backbone of a state dict: its architecture (family, depth, ResNeXt groups, DCN) and
the Detectron2 names of its keys, shared by the ImageNet and MMDetection conversions."""

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from .report import ConversionError

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
