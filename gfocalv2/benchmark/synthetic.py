"""Synthetic inputs: random images with random boxes, and fixed classification logits that
give every model the same number of confident candidates to post-process."""

import math
from typing import Dict, List

import torch
from detectron2.structures import Boxes, Instances
from torch import nn

__all__ = [
    "synthetic_batch",
    "SyntheticLogits",
    "add_synthetic_logits",
    "trained_like_scores",
    "calibrate_batch_norms",
]


def synthetic_batch(
    batch_size: int, height: int, width: int, num_gt: int, num_classes: int, seed: int = 0
) -> List[Dict]:
    """Random images (3, H, W) in [0, 255] with ``num_gt`` random boxes (8 to 40% of the
    image side) and classes each, as Detectron2's ``DatasetMapper`` outputs."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(batch_size):
        size = torch.rand(num_gt, 2, generator=g) * 0.32 + 0.08
        size = size * torch.tensor([width, height])
        xy = torch.rand(num_gt, 2, generator=g) * (torch.tensor([width, height]) - size)
        inst = Instances((height, width))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + size], dim=1))
        inst.gt_classes = torch.randint(0, num_classes, (num_gt,), generator=g)
        image = torch.rand(3, height, width, generator=g) * 255
        batch.append({"image": image, "instances": inst, "height": height, "width": width})
    return batch


class SyntheticLogits:
    """A forward hook on a head's classification conv that returns fixed logits: about
    ``num_pairs`` random (location, anchor, class) entries per image over all levels get
    probabilities uniform in [0.1, 0.95], all others -8 (probability 3e-4). It replaces the
    conv output (same shape), so every model post-processes the same number of confident
    candidates whatever its weights. ``total_entries``: the conv's output entries per image
    summed over levels (each level gets its share in proportion to its size)."""

    def __init__(self, num_pairs: int, total_entries: int, seed: int = 0):
        self.fraction = min(1.0, num_pairs / max(1, total_entries))
        self.seed, self.cache = seed, {}

    def __call__(self, module, inputs, output):
        key = tuple(output.shape)
        if key not in self.cache:  # made once per level shape, outside the timed steady state
            self.cache[key] = self._make(output)
        # A copy: some models apply sigmoid_ in place to views of the head outputs.
        return self.cache[key].clone()

    def _make(self, output: torch.Tensor) -> torch.Tensor:
        N, K, H, W = output.shape
        g = torch.Generator().manual_seed(self.seed + 7919 * H + W)
        k = int(round(self.fraction * K * H * W))
        logits = torch.full((N, K * H * W), -8.0)
        for n in range(N):
            idx = torch.randperm(K * H * W, generator=g)[:k]
            prob = torch.rand(k, generator=g) * 0.85 + 0.1
            logits[n, idx] = torch.log(prob / (1 - prob))
        logits = logits.reshape(N, K, H, W).to(device=output.device, dtype=output.dtype)
        channels_last = output.is_contiguous(memory_format=torch.channels_last)
        if not output.is_contiguous() and channels_last:  # as the real conv's output
            logits = logits.contiguous(memory_format=torch.channels_last)
        return logits


def add_synthetic_logits(model: nn.Module, num_pairs: int, image_hw) -> bool:
    """Install :class:`SyntheticLogits` on ``model.head.cls_score`` for inputs of ``image_hw``."""
    conv = getattr(getattr(model, "head", None), "cls_score", None)
    if conv is None:
        return False
    shapes = model.backbone.output_shape()
    div = max(1, model.backbone.size_divisibility)
    H, W = (math.ceil(x / div) * div for x in image_hw)
    locations = sum(
        math.ceil(H / shapes[f].stride) * math.ceil(W / shapes[f].stride)
        for f in model.head_in_features
    )
    conv.register_forward_hook(SyntheticLogits(num_pairs, conv.out_channels * locations))
    return True


def trained_like_scores(model: nn.Module, seed: int = 0) -> nn.Module:
    """Set ``model``'s classification (and box) layers so that scores vary from location to
    location and class to class, as a trained model's do: a few thousand (location, class)
    pairs above 0.05 on an 800 x 1216 input, 100 detections after NMS. Random weights give
    every score about the prior (0.01): nothing to post-process. In place; returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.head.cls_score.weight
        w.copy_(torch.randn(w.shape, generator=g) * 0.02)
        model.head.cls_score.bias.fill_(-2.3)
        b = model.head.bbox_pred.weight
        b.copy_(torch.randn(b.shape, generator=g) * 0.02)
    return model


@torch.no_grad()
def calibrate_batch_norms(model: nn.Module, image: torch.Tensor) -> nn.Module:
    """Set the running statistics of every BatchNorm of ``model`` to the statistics of its input
    on ``image`` (3, H, W), in one inference pass, as training would have made them. Without
    this, a BatchNorm head with random weights and initial statistics (mean 0, variance 1) gives
    activations far from a trained model's, and no detections. In place; returns ``model``."""

    def set_statistics(module, inputs):
        x = inputs[0].float()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))

    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]
    handles = [m.register_forward_pre_hook(set_statistics) for m in norms]
    try:
        model.eval()([{"image": image}])
    finally:
        for h in handles:
            h.remove()
    return model
