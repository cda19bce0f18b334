"""Generalized Focal Loss: Quality Focal Loss (QFL) and Distribution Focal Loss (DFL).

Both return unreduced per-sample losses; the caller normalizes them as the reference
does (see :meth:`gfocalv2.modeling.meta_arch.GFocalV2.losses`). Both run in float32
with autocast off: binary cross-entropy on probabilities is rejected by autocast and
overflows in half precision.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["quality_focal_loss", "distribution_focal_loss"]


def _float32_no_autocast(fn):
    def wrapper(*args, **kwargs):
        args = [a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
        device_type = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


@_float32_no_autocast
def quality_focal_loss(
    pred: Tensor, label: Tensor, score: Tensor, beta: float = 2.0, use_sigmoid: bool = False
) -> Tensor:
    """Quality Focal Loss (GFL paper, eq. 5), summed over classes.

    ``QFL(s) = -|y - s|^beta * ((1 - y) log(1 - s) + y log(s))`` for every class, where
    ``y`` is the IoU target ``score`` on a positive sample's own class and 0 elsewhere.

    Args:
        pred: (N, C) joint class-quality scores in [0, 1] (or logits if ``use_sigmoid``).
        label: (N,) int64 class indices in [0, C]; C means background.
        score: (N,) IoU targets of the positives (ignored for background samples).
        beta: modulating exponent.
        use_sigmoid: ``pred`` holds logits (GFLV1); the loss then uses the numerically
            stable binary cross-entropy with logits.

    Returns:
        (N,) loss per sample.
    """
    num_classes = pred.shape[1]
    positive = F.one_hot(label, num_classes + 1)[:, :num_classes].bool()  # (N, C)
    target = torch.where(positive, score[:, None].to(pred.dtype), torch.zeros_like(pred))
    if use_sigmoid:
        prob = pred.sigmoid()
        bce = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
    else:
        prob = pred
        bce = F.binary_cross_entropy(pred, target, reduction="none")
    modulator = torch.where(positive, (target - prob).abs(), prob).pow(beta)
    return (bce * modulator).sum(dim=1)


@_float32_no_autocast
def distribution_focal_loss(pred: Tensor, label: Tensor) -> Tensor:
    """Distribution Focal Loss (GFL paper, eq. 6).

    ``DFL = -((y_r - y) log S_l + (y - y_l) log S_r)`` with ``y_l = floor(y)``,
    ``y_r = y_l + 1`` and ``S = softmax(pred)``.

    Args:
        pred: (N, n + 1) logits of the distribution over {0, ..., n}.
        label: (N,) float targets in [0, n).

    Returns:
        (N,) loss per sample.
    """
    left = label.long()
    right = left + 1
    weight_left = right.to(label.dtype) - label
    weight_right = label - left.to(label.dtype)
    log_prob = F.log_softmax(pred, dim=1)
    return -(
        log_prob.gather(1, left[:, None]).squeeze(1) * weight_left
        + log_prob.gather(1, right[:, None]).squeeze(1) * weight_right
    )
