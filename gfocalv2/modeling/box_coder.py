"""Boxes as general distributions of their four side distances (GFL).

A box is regressed from a point (the anchor centre) as distances
(left, top, right, bottom), each a discrete distribution over {0, 1, ..., reg_max}
in stride units; the distance is the distribution's expectation.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["distribution_to_distance", "distance_to_box", "box_to_distance"]


def distribution_to_distance(logits: Tensor, reg_max: int) -> Tensor:
    """Expected side distances of general distributions.

    Args:
        logits: (..., 4 * (reg_max + 1)), side-major: [left bins, top bins, right bins, bottom bins].

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
