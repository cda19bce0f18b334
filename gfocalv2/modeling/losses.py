"""Generalized Focal Loss: Quality Focal Loss (QFL) and Distribution Focal Loss (DFL), and the
GIoU loss they are trained with.

Both return unreduced per-sample losses; the caller normalizes them as the reference
does (see :meth:`gfocalv2.modeling.meta_arch.GFocalV2.losses`). Both run in float32
with autocast off: binary cross-entropy on probabilities is rejected by autocast and
overflows in half precision.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["quality_focal_loss", "distribution_focal_loss", "giou_loss"]


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
        # binary_cross_entropy refuses a NaN probability with an error (a device-side assert on
        # CUDA) that hides a diverged run: NaN in, NaN loss out instead ("pred - pred" is 0 where
        # pred is finite, so finite losses and their gradients are unchanged), which the trainer
        # reports as a non-finite loss.
        finite_pred = pred.nan_to_num(nan=0.5, posinf=1.0, neginf=0.0)
        bce = F.binary_cross_entropy(finite_pred, target, reduction="none") + (pred - pred)
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


def giou_loss(boxes: Tensor, target_boxes: Tensor, eps: float = 1e-7) -> Tensor:
    """Generalized IoU loss ``1 - GIoU``, per box pair: fvcore's ``giou_loss`` (Detectron2's)
    value for value, without its two ``assert (x2 >= x1).all()`` checks and its masked
    assignment, which synchronize with the host at every training step, and which turn a
    diverged run (NaN boxes) into an assertion error instead of a NaN loss.

    Args:
        boxes, target_boxes: (N, 4) boxes in XYXY format.

    Returns:
        (N,) loss per pair.
    """
    x1, y1, x2, y2 = boxes.unbind(dim=-1)
    x1g, y1g, x2g, y2g = target_boxes.unbind(dim=-1)
    inter_w = torch.min(x2, x2g) - torch.max(x1, x1g)
    inter_h = torch.min(y2, y2g) - torch.max(y1, y1g)
    overlap = (inter_h > 0) & (inter_w > 0)
    intersection = torch.where(overlap, inter_w * inter_h, torch.zeros_like(inter_w))
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - intersection
    iou = intersection / (union + eps)
    enclosing = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (
        torch.max(y2, y2g) - torch.min(y1, y1g)
    )
    return 1 - (iou - (enclosing - union) / (enclosing + eps))
