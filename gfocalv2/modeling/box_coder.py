"""Boxes as general distributions of their four side distances (GFL).

A box is regressed from a point (the anchor centre) as distances
(left, top, right, bottom), each a discrete distribution over {0, 1, ..., reg_max}
in stride units; the distance is the distribution's expectation.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["distribution_to_distance", "distance_to_box", "box_to_distance", "distance_targets"]


def distribution_to_distance(logits: Tensor, reg_max: int) -> Tensor:
    """Expected side distances of general distributions.

    Args:
        logits: (..., 4 * (reg_max + 1)), side-major: [left bins, top bins, right bins,
            bottom bins].

    Returns:
        (..., 4) distances in bins (stride units), each in [0, reg_max].
    """
    prob = F.softmax(logits.reshape(*logits.shape[:-1], 4, reg_max + 1).float(), dim=-1)
    bins = torch.arange(reg_max + 1, dtype=prob.dtype, device=prob.device)
    return (prob * bins).sum(dim=-1)


def distance_to_box(points: Tensor, distances: Tensor) -> Tensor:
    """(..., 2) points and (..., 4) ltrb distances -> (..., 4) XYXY boxes."""
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)


def box_to_distance(points: Tensor, boxes: Tensor) -> Tensor:
    """(..., 2) points and (..., 4) XYXY boxes -> (..., 4) ltrb distances (may be negative)."""
    return torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1)


def distance_targets(
    points: Tensor, boxes: Tensor, strides: Tensor, reg_max: int, eps: float = 0.1
) -> Tensor:
    """Regression (DFL) targets: the ltrb distances from the points to the boxes in stride units,
    clamped to [0, reg_max - eps].

    Args:
        points: (..., 2); boxes: (..., 4) XYXY; strides: (...,) of each point's level.
        eps: the margin below reg_max; 0.1 as the reference's ``bbox2distance`` (15.9 for
            reg_max 16). It must be > 0: the DFL splits a target y between the bins floor(y)
            and floor(y) + 1, which must exist (<= reg_max).

    Returns:
        (..., 4) float targets in [0, reg_max - eps].
    """
    return (box_to_distance(points, boxes) / strides[..., None]).clamp(min=0.0, max=reg_max - eps)
