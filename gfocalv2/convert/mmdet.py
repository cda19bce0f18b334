"""The authors' MMDetection GFocalV2 / GFL checkpoints -> Detectron2 GFocalV2 state dicts."""

import re
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch

from .backbone import _convert_backbone, _strip_prefix, detect_backbone
from .report import ConversionError, ConversionReport


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
