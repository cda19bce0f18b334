"""ImageNet classification weights (torchvision, open-mmlab, Res2Net) -> the bottom-up
backbone of a Detectron2 checkpoint."""

from collections import OrderedDict
from typing import Dict, Optional

import torch

from .backbone import _convert_backbone, _strip_prefix, detect_backbone
from .report import ConversionReport


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
