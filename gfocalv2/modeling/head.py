"""The GFocal head: shared classification/regression towers, the general-distribution
box branch, and GFLV2's Distribution-Guided Quality Predictor (DGQP)."""

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm
from torch import Tensor, nn

__all__ = ["GFocalHead", "Scale", "DistributionGuidedQualityPredictor"]


def _init_normal(module: nn.Module) -> None:
    """The authors' head init: every conv N(0, 0.01) with bias 0, every GroupNorm 1 and 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, mean=0.0, std=0.01)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0.0)
        elif isinstance(m, nn.GroupNorm):
            nn.init.constant_(m.weight, 1.0)
            nn.init.constant_(m.bias, 0.0)


class Scale(nn.Module):
    """A learnable scalar multiplier (one per pyramid level), initialized to ``init``."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(init, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class DistributionGuidedQualityPredictor(nn.Sequential):
    """DGQP: the IoU quality of a box from the shape of its four side distributions.

    Each side's softmax distribution over reg_max + 1 bins is summarized by its ``topk``
    largest probabilities (plus their mean if ``add_mean``), and a two-layer 1x1-conv MLP
    maps the 4 x (topk [+ 1]) statistics to one quality logit per location.
    The input is not detached: its gradient reaches the regression branch, as in the
    reference.
    """

    def __init__(self, reg_max: int, topk: int, add_mean: bool, channels: int):
        in_channels = 4 * (topk + int(add_mean))
        super().__init__(
            nn.Conv2d(in_channels, channels, 1), nn.ReLU(inplace=True), nn.Conv2d(channels, 1, 1)
        )
        self.reg_max, self.topk, self.add_mean = reg_max, topk, add_mean

    def forward(self, box_logits: Tensor) -> Tensor:
        """(N, 4 * (reg_max + 1), H, W) distribution logits -> (N, 1, H, W) quality logits."""
        N, _, H, W = box_logits.shape
        prob = F.softmax(box_logits.float().reshape(N, 4, self.reg_max + 1, H, W), dim=2)
        stat = prob.topk(self.topk, dim=2).values  # (N, 4, topk, H, W)
        if self.add_mean:
            stat = torch.cat([stat, stat.mean(dim=2, keepdim=True)], dim=2)
        return super().forward(stat.reshape(N, -1, H, W).to(box_logits.dtype))


class GFocalHead(nn.Module):
    """Shared over pyramid levels: two towers of ``num_convs`` x [conv3x3, norm, ReLU],
    a classification conv (C outputs), a regression conv (4 x (reg_max + 1) outputs,
    times a learnable per-level scale) and, for GFLV2, the DGQP on the regression output.
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: List[ShapeSpec],
        num_classes: int,
        num_convs: int = 4,
        norm: str = "GN",
        prior_prob: float = 0.01,
        reg_max: int = 16,
        dgqp_enabled: bool = True,
        dgqp_topk: int = 4,
        dgqp_add_mean: bool = True,
        dgqp_channels: int = 64,
    ):
        super().__init__()
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(
                "GFocalHead shares its convs over levels: all input levels need the same channels, "
                f"got {sorted(channels)}"
            )
        in_channels = channels.pop()
        if reg_max < 1:
            raise ValueError(f"MODEL.GFOCAL.REG_MAX must be >= 1, got {reg_max}")
        if dgqp_enabled and not 1 <= dgqp_topk <= reg_max + 1:
            raise ValueError(
                f"MODEL.GFOCAL.DGQP_TOPK must be in [1, REG_MAX + 1 = {reg_max + 1}], got "
                f"{dgqp_topk}"
            )
        self.num_classes = num_classes
        self.reg_max = reg_max

        def tower():
            layers = []
            for _ in range(num_convs):
                # As the reference's ConvModule: no conv bias when a norm follows.
                layers.append(nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=not norm))
                if norm:
                    layers.append(get_norm(norm, in_channels))  # "GN": 32 groups
                layers.append(nn.ReLU(inplace=True))
            return nn.Sequential(*layers)

        self.cls_subnet = tower()
        self.bbox_subnet = tower()
        # C channels. The authors' GFLV2 has C + 1 (QualityFocalLoss(use_sigmoid=False)), the last
        # trained to 0 on every anchor: a class that never occurs, whose joint score only adds a
        # small, vanishing push-down of the quality. Left out on purpose (README "The model, in
        # numbers"); the converter drops it from their checkpoints.
        self.cls_score = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in input_shape])
        _init_normal(self)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))
        # Built and initialized last, so that with the same seed GFocalV2 and GFL (V1) start from
        # the same weights everywhere else: a seeded comparison differs by the DGQP alone.
        self.dgqp = None
        if dgqp_enabled:
            self.dgqp = DistributionGuidedQualityPredictor(
                reg_max, dgqp_topk, dgqp_add_mean, dgqp_channels
            )
            _init_normal(self.dgqp)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        g = cfg.MODEL.GFOCAL
        return {
            "input_shape": input_shape,
            "num_classes": g.NUM_CLASSES,
            "num_convs": g.NUM_CONVS,
            "norm": g.NORM,
            "prior_prob": g.PRIOR_PROB,
            "reg_max": g.REG_MAX,
            "dgqp_enabled": g.DGQP_ENABLED,
            "dgqp_topk": g.DGQP_TOPK,
            "dgqp_add_mean": g.DGQP_ADD_MEAN,
            "dgqp_channels": g.DGQP_CHANNELS,
        }

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """
        Args:
            features: per-level (N, C_in, H_l, W_l) feature maps.

        Returns:
            cls_logits: per-level (N, num_classes, H_l, W_l).
            box_logits: per-level (N, 4 * (reg_max + 1), H_l, W_l) side-distribution logits.
            quality_logits: per-level (N, 1, H_l, W_l) DGQP logits; empty list for GFLV1.
        """
        cls_logits, box_logits, quality_logits = [], [], []
        for feature, scale in zip(features, self.scales):
            cls_logits.append(self.cls_score(self.cls_subnet(feature)))
            box = scale(self.bbox_pred(self.bbox_subnet(feature)))
            box_logits.append(box)
            if self.dgqp is not None:
                quality_logits.append(self.dgqp(box))
        return cls_logits, box_logits, quality_logits
