"""Speed of GFocalV2 against Detectron2's own dense detectors, measured side by side.

    python -m gfocalv2.benchmark --config-file configs/COCO-Detection/gfocalv2_R_50_FPN_1x.yaml \\
        --task inference --num-iter 5 --compare retinanet,fcos,gfl --input-size 800 1333

Tasks:

* ``inference``: per-image latency at batch ``--batch-size`` (default 1) of
  ``model.eval()`` under ``torch.no_grad()``, split into preprocess / backbone (+FPN) /
  head / postprocess (score ranking, decode, NMS, rescaling to the input size).
* ``train``: one training iteration (forward, backward, SGD step) on synthetic images
  with ``--num-gt`` random ground-truth boxes each, split into backbone+head forward,
  targets (anchor labelling: ATSS for GFocal), losses forward, losses backward (down to
  the head outputs), backbone+head backward, optimizer step.
* ``data``: time per batch of Detectron2's training data loader over
  ``DATASETS.TRAIN`` (no model).

``--compare`` adds models built with the *same* ResNet (depth, norm, frozen stages, stride
placement), FPN channels, tower depth, number of classes and input:

* ``retinanet``: Detectron2's model-zoo ``COCO-Detection/retinanet_R_50_FPN_1x.yaml``;
* ``fcos``: Detectron2's model-zoo LazyConfig ``COCO-Detection/fcos_R_50_FPN_1x.py``;
* ``gfl``: this config with ``MODEL.GFOCAL.DGQP_ENABLED False`` (GFLV1);
* ``gfocalv2``: this config with the DGQP on.

All models get random weights (or ``MODEL.WEIGHTS`` for the config's own model). After
``--warmup`` untimed rounds, every round runs each model once, in an order that rotates
from round to round, so that the machine's drift (other jobs on a shared CPU, thermal
state) reaches every model alike. Reported: median, min, max and interquartile range of
the per-iteration time, and for every compared model the ratio of *our* time to its
time, as the median of the per-round ratios (paired, robust to drift).

Random weights put no score above the detection threshold, which would make
post-processing look free. ``--detections K`` (default 1000) therefore replaces each
model's classification logits by fixed synthetic ones in which ``K`` (location, class)
pairs per image score in [0.1, 0.95] and all others ~3e-4, so every model's
post-processing ranks, decodes and NMS-es a realistic number of candidates (the same
number for every model). ``--detections 0`` keeps the raw random-weight outputs.

Inference optimizations (``--optimize``, inference only): ``ours`` (the default) runs our
model the way the predictor, the demo, the exporter and evaluation run it, with the exact
rewrites ``TEST.FOLD_BATCHNORM`` / ``TEST.MEMORY_FORMAT`` of the config (see
``gfocalv2/modeling/inference_optimization.py``), and Detectron2's models the way Detectron2
runs them; ``all`` applies the same rewrites to every model (like for like); ``none`` to
none.

Other options: ``--amp`` (autocast: bfloat16 on CPU, float16 on CUDA), ``--channels-last``
(every model in NHWC), ``--flops`` (GFLOPs of each model's backbone and head, counted once,
untimed), ``--json FILE`` (the summary). On a CPU shared with other jobs use
``--threads 1 --timer cpu``: several OpenMP threads on a contended core wait at every
barrier for the preempted one (runs become several times slower and erratic), and the
process CPU time leaves out the time spent waiting for a core.
"""
import argparse
import contextlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

import gfocalv2  # noqa: F401  (compat layer + registrations before other detectron2 imports)
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from .engine.defaults import build_cfg
from .modeling.inference_optimization import optimize_for_inference, resolve_memory_format, to_channels_last

try:  # "BNEval" and other norms of this project's backbones, as Detectron2 get_norm arguments
    from .modeling.backbone.resnet import resolve_norm
except ImportError:  # pragma: no cover
    def resolve_norm(norm):
        return norm

__all__ = ["main", "build_models", "run_benchmark", "format_report"]

logger = logging.getLogger("gfocalv2.benchmark")

KNOWN_MODELS = ("gfocalv2", "gfl", "retinanet", "fcos")
OUR_MODELS = ("gfocalv2", "gfl")  # this project's: --optimize ours applies to these


# ----------------------------------------------------------------------------- models
def _our_model(cfg, dgqp: bool) -> nn.Module:
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.GFOCAL.DGQP_ENABLED = dgqp
    return build_model(cfg)


def _retinanet(cfg) -> nn.Module:
    """Detectron2's model-zoo RetinaNet R-50-FPN 1x with our backbone depth, norm, frozen
    stages, FPN channels, tower depth and number of classes; random weights."""
    from detectron2 import model_zoo

    r = get_cfg()
    r.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    r.MODEL.WEIGHTS = ""
    r.MODEL.DEVICE = cfg.MODEL.DEVICE
    # The same ResNet: the model zoo's is MSRA-style (stride in the 1x1 conv), ours
    # pytorch-style (stride in the 3x3), 4% more backbone FLOPs at the same depth.
    for key in ("DEPTH", "RES2_OUT_CHANNELS", "NUM_GROUPS", "WIDTH_PER_GROUP", "STRIDE_IN_1X1"):
        setattr(r.MODEL.RESNETS, key, getattr(cfg.MODEL.RESNETS, key))
    # Our norm names ("BNEval") are classes for Detectron2's get_norm; yacs refuses
    # non-primitive values through setattr, so store it as a plain dict item.
    dict.__setitem__(r.MODEL.RESNETS, "NORM", resolve_norm(cfg.MODEL.RESNETS.NORM))
    r.MODEL.BACKBONE.FREEZE_AT = cfg.MODEL.BACKBONE.FREEZE_AT
    r.MODEL.FPN.OUT_CHANNELS = cfg.MODEL.FPN.OUT_CHANNELS
    r.MODEL.RETINANET.NUM_CLASSES = cfg.MODEL.GFOCAL.NUM_CLASSES
    r.MODEL.RETINANET.NUM_CONVS = cfg.MODEL.GFOCAL.NUM_CONVS
    return build_model(r)


def _fcos(cfg) -> nn.Module:
    """Detectron2's model-zoo FCOS R-50-FPN 1x (a LazyConfig in Detectron2 0.6) with our
    backbone depth, norm, frozen stages, FPN channels, tower depth and classes."""
    from detectron2 import model_zoo
    from detectron2.config import instantiate
    from detectron2.layers import ShapeSpec

    lazy = model_zoo.get_config("COCO-Detection/fcos_R_50_FPN_1x.py")
    m = lazy.model
    res, channels = cfg.MODEL.RESNETS, cfg.MODEL.FPN.OUT_CHANNELS
    m.backbone.bottom_up.stem.norm = resolve_norm(res.NORM)
    m.backbone.bottom_up.stages.depth = res.DEPTH
    m.backbone.bottom_up.stages.norm = resolve_norm(res.NORM)
    m.backbone.bottom_up.freeze_at = cfg.MODEL.BACKBONE.FREEZE_AT
    if res.DEPTH in (18, 34):  # basic blocks take no stride_in_1x1
        del m.backbone.bottom_up.stages.stride_in_1x1
    else:
        m.backbone.bottom_up.stages.stride_in_1x1 = res.STRIDE_IN_1X1
    m.backbone.out_channels = channels
    m.backbone.top_block.in_channels = channels
    m.head.input_shape = [ShapeSpec(channels=channels)] * 5
    m.head.conv_dims = [channels] * cfg.MODEL.GFOCAL.NUM_CONVS
    m.num_classes = cfg.MODEL.GFOCAL.NUM_CLASSES
    # Detectron2 0.6's RetinaNetHead probes its norm with get_norm(norm, 1), and "GN" then
    # builds GroupNorm(32, 1), which today's torch rejects: pass the same GN as a callable
    # that survives the probe (the real layers are GroupNorm(32, channels) as "GN" gives).
    m.head.norm = _group_norm_32
    return instantiate(m).to(cfg.MODEL.DEVICE)


def _group_norm_32(channels: int) -> nn.Module:
    return nn.GroupNorm(32 if channels % 32 == 0 else 1, channels)


def build_models(cfg, names: Sequence[str]) -> "OrderedDict[str, nn.Module]":
    """Models by name; "ours" is the config's own model (GFocalV2 or GFLV1 per its DGQP flag),
    loaded from ``MODEL.WEIGHTS`` if set."""
    from detectron2.checkpoint import DetectionCheckpointer

    ours_name = "gfocalv2" if cfg.MODEL.GFOCAL.DGQP_ENABLED else "gfl"
    models = OrderedDict()
    ours = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(ours).load(cfg.MODEL.WEIGHTS)
    models[ours_name] = ours
    builders = {
        "gfocalv2": lambda: _our_model(cfg, True),
        "gfl": lambda: _our_model(cfg, False),
        "retinanet": lambda: _retinanet(cfg),
        "fcos": lambda: _fcos(cfg),
    }
    for name in names:
        if name in models:
            continue
        if name not in builders:
            raise ValueError(f"--compare: unknown model {name!r}; choose from {', '.join(KNOWN_MODELS)}")
        try:
            models[name] = builders[name]()
        except Exception as e:  # report and go on with the others
            logger.warning("could not build %s: %s: %s", name, type(e).__name__, e)
            print(f"[benchmark] {name}: not built ({type(e).__name__}: {e})", flush=True)
    return models


# ----------------------------------------------------------------------------- inputs
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
        if not output.is_contiguous() and output.is_contiguous(memory_format=torch.channels_last):
            logits = logits.contiguous(memory_format=torch.channels_last)  # as the real conv's output
        return logits


def add_synthetic_logits(model: nn.Module, num_pairs: int, image_hw) -> bool:
    """Install :class:`SyntheticLogits` on ``model.head.cls_score`` for inputs of ``image_hw``."""
    conv = getattr(getattr(model, "head", None), "cls_score", None)
    if conv is None:
        return False
    shapes = model.backbone.output_shape()
    div = max(1, model.backbone.size_divisibility)
    H, W = (math.ceil(x / div) * div for x in image_hw)
    locations = sum(math.ceil(H / shapes[f].stride) * math.ceil(W / shapes[f].stride) for f in model.head_in_features)
    conv.register_forward_hook(SyntheticLogits(num_pairs, conv.out_channels * locations))
    return True


def use_channels_last(model: nn.Module) -> None:
    """Weights and backbone input in channels-last (NHWC) layout; convolutions keep it, so
    the whole network runs in NHWC (often faster with oneDNN on CPU and tensor cores)."""
    to_channels_last(model)
    model.backbone.register_forward_pre_hook(
        lambda module, inputs: tuple(x.contiguous(memory_format=torch.channels_last) for x in inputs)
    )


def apply_inference_optimizations(models: "OrderedDict[str, nn.Module]", cfg, mode: str) -> Dict[str, str]:
    """``--optimize``: "ours" optimizes this project's models (GFocalV2, GFL) as ``cfg.TEST``
    says, "all" every model the same way, "none" nothing. Returns a description per model."""
    if mode not in ("ours", "all", "none"):
        raise ValueError(f"--optimize must be ours, all or none, got {mode!r}")
    done = {}
    for name, model in models.items():
        if mode == "all" or (mode == "ours" and name in OUR_MODELS):
            optimize_for_inference(model, cfg)
            fmt = resolve_memory_format(cfg.TEST.MEMORY_FORMAT, cfg.MODEL.DEVICE)
            done[name] = f"fold BN {cfg.TEST.FOLD_BATCHNORM}, {fmt}"
        else:
            done[name] = "as built"
    return done


# ----------------------------------------------------------------------------- timing
class Stopwatch:
    """Accumulates time per named stage; synchronizes CUDA around each stage.

    ``clock``: ``time.perf_counter`` (wall time, the default) or ``time.process_time`` (CPU
    time of this process: on a CPU shared with other jobs, the time this process computed,
    without the time it waited for a core; meaningful with CPU inference only).
    """

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.perf_counter):
        self.cuda = device.type == "cuda"
        self.clock = clock
        self.times: Dict[str, float] = OrderedDict()

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def stage(self, name: str):
        self._sync()
        start = self.clock()
        try:
            yield
        finally:
            self._sync()
            self.times[name] = self.times.get(name, 0.0) + self.clock() - start


def inference_step(model: nn.Module, batch: List[Dict], sw: Stopwatch):
    """``DenseDetector.forward`` in eval mode, stage by stage (same calls, same order)."""
    with sw.stage("preprocess"):
        images = model.preprocess_image(batch)
    with sw.stage("backbone"):
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
    with sw.stage("head"):
        predictions = model.head(features)
    with sw.stage("postprocess"):
        results = model.forward_inference(images, features, predictions)
        results = [
            detector_postprocess(r, x.get("height", s[0]), x.get("width", s[1]))
            for r, x, s in zip(results, batch, images.image_sizes)
        ]
    return results


def _flat_tensors(obj) -> List[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _flat_tensors(o)]
    return []


def _split_points(outputs: List[torch.Tensor]):
    """Where to split the backward pass: the outputs not computed from another output, and
    the parameters used between dependent outputs and the others.

    GFLV2's quality logits are computed from its box logits by the DGQP: the gradient of the
    loss w.r.t. the box logits already includes the path through the DGQP, so the second
    part must not start from the quality logits again, and the DGQP's parameters get their
    gradient in the first part. Walks at most 64 autograd nodes per output.
    """
    nodes = {o.grad_fn for o in outputs if o.grad_fn is not None}
    independent, params = [], []
    for out in outputs:
        stack, seen, dependent, leaves = [out.grad_fn], set(), False, []
        while stack and len(seen) < 64:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            if fn is not out.grad_fn and fn in nodes:
                dependent = True  # computed from another output: do not walk below it
                continue
            if hasattr(fn, "variable"):  # AccumulateGrad: a parameter
                leaves.append(fn.variable)
            stack.extend(f for f, _ in fn.next_functions)
        if dependent:  # shared over levels: each parameter once
            params += [p for p in leaves if not any(p is q for q in params)]
        else:
            independent.append(out)
    return independent, params


def _time_targets(model: nn.Module, sw: Stopwatch):
    """Time the model's anchor labelling (``label_anchors``, called by ``forward_training``
    of GFocalV2, RetinaNet and FCOS) as the "targets" stage."""
    inner = getattr(model, "label_anchors", None)
    if inner is None:
        return contextlib.nullcontext()

    def timed(*args, **kwargs):
        with sw.stage("targets"):
            return inner(*args, **kwargs)

    @contextlib.contextmanager
    def patched():
        model.label_anchors = timed
        try:
            yield
        finally:
            del model.label_anchors  # back to the class's method

    return patched()


def split_backward(loss: torch.Tensor, predictions, sw: Stopwatch) -> None:
    """``loss.backward()`` in two timed parts, split at the head outputs ``predictions``
    (nested lists of tensors): "losses backward" (loss -> head outputs), then "backbone+head
    backward" (head outputs -> parameters). Same gradients as one ``loss.backward()``."""
    outputs, params = _split_points([t for t in _flat_tensors(predictions) if t.requires_grad])
    with sw.stage("losses backward"):
        grads = torch.autograd.grad(loss, outputs + params, allow_unused=True)
        grads, param_grads = grads[: len(outputs)], grads[len(outputs):]
        for p, g in zip(params, param_grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
    with sw.stage("backbone+head backward"):
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


def train_step(model: nn.Module, batch: List[Dict], optimizer: torch.optim.Optimizer, sw: Stopwatch):
    """One SGD iteration of ``DenseDetector.forward`` in training mode, stage by stage.

    The backward pass is split at the head outputs: first the gradient of the loss with
    respect to the head's outputs ("losses backward"), then from there through the head
    and backbone ("backbone+head backward"); together they are exactly one backward pass.
    """
    with sw.stage("preprocess"):
        images = model.preprocess_image(batch)
        gt_instances = [x["instances"].to(model.device) for x in batch]
    with sw.stage("backbone+head forward"):
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        predictions = model.head(features)
    with sw.stage("targets+losses forward"), _time_targets(model, sw):
        losses = model.forward_training(images, features, predictions, gt_instances)
        loss = sum(losses.values())
    split_backward(loss, predictions, sw)
    with sw.stage("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if "targets" in sw.times:  # report "losses forward" without the targets inside it
        t = sw.times
        t["losses forward"] = t.pop("targets+losses forward") - t["targets"]
        order = ("preprocess", "backbone+head forward", "targets", "losses forward", "losses backward")
        sw.times = OrderedDict([(k, t.pop(k)) for k in order] + list(t.items()))
    return {k: float(v.detach()) for k, v in losses.items()}


def count_flops(model: nn.Module, batch: List[Dict]) -> Dict[str, float]:
    """GFLOPs (multiply-add = 2) of one inference: backbone (+FPN) and head, counted by
    ``torch.utils.flop_counter`` (convolutions and matmuls; norms and activations are not
    counted). A machine-independent yardstick for the timed ratios."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad():
        images = model.preprocess_image(batch)
        with FlopCounterMode(display=False) as counter:
            features = model.backbone(images.tensor)
        backbone = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            model.head([features[f] for f in model.head_in_features])
        head = counter.get_total_flops()
    model.train(was_training)
    return OrderedDict(backbone_gflops=backbone / 1e9, head_gflops=head / 1e9, total_gflops=(backbone + head) / 1e9)


# ----------------------------------------------------------------------------- runs
def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def run_benchmark(
    models: "OrderedDict[str, nn.Module]",
    batch: List[Dict],
    task: str,
    num_iter: int,
    warmup: int = 1,
    amp: bool = False,
    lr: float = 1e-4,
    log: Callable[[str], None] = print,
    clock: Callable[[], float] = time.perf_counter,
) -> Dict[str, List[Dict[str, float]]]:
    """Interleaved runs: ``warmup`` + ``num_iter`` rounds, each model once per round in a
    rotating order. Returns per model the list of per-round stage times (seconds)."""
    device = next(iter(models.values())).device
    names = list(models)
    optimizers = {}
    for name, model in models.items():
        if task == "train":
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizers[name] = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
        else:
            model.eval()
    records = {name: [] for name in names}
    grad = contextlib.nullcontext() if task == "train" else torch.no_grad()
    with EventStorage(0), grad, _autocast(device, amp):
        for r in range(warmup + num_iter):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                sw = Stopwatch(device, clock)
                if task == "train":
                    train_step(models[name], batch, optimizers[name], sw)
                else:
                    inference_step(models[name], batch, sw)
                times = dict(sw.times)
                times["total"] = sum(sw.times.values())
                if r >= warmup:
                    records[name].append(times)
                log(f"[benchmark] round {r + 1 - warmup if r >= warmup else 'warm-up'} {name}: {times['total']:.3f} s")
    return records


def _quantile(values: List[float], q: float) -> float:
    values = sorted(values)
    pos = q * (len(values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def summarize(records, ours: str, batch_size: int) -> Dict:
    """Medians, spreads, stage shares and paired ratios ours / other."""
    summary = OrderedDict()
    for name, rounds in records.items():
        totals = [t["total"] for t in rounds]
        stages = OrderedDict((k, statistics.median(t[k] for t in rounds)) for k in rounds[0] if k != "total")
        median = statistics.median(totals)
        entry = OrderedDict(
            median_s=median,
            min_s=min(totals),
            max_s=max(totals),
            iqr_s=_quantile(totals, 0.75) - _quantile(totals, 0.25),
            per_image_s=median / batch_size,
            images_per_s=batch_size / median if median > 0 else float("inf"),
            stages_s=stages,
            stage_share=OrderedDict((k, statistics.median(t[k] / t["total"] for t in rounds)) for k in stages),
        )
        if name != ours and ours in records:
            ratios = [a["total"] / b["total"] for a, b in zip(records[ours], rounds)]
            entry["ratio_ours_over_this"] = statistics.median(ratios)
            entry["ratio_range"] = (min(ratios), max(ratios))
        summary[name] = entry
    return summary


def format_report(summary: Dict, task: str, ours: str, header: str) -> str:
    lines = [header]
    rate = "images/s" if task != "inference" else "fps"
    lines.append(
        f"{'model':<10} {'median_s':>9} {'min_s':>8} {'max_s':>8} {'iqr_s':>7} {'per_image_s':>11} {rate:>9}"
        f"   {ours}/model (paired median, range)"
    )
    for name, e in summary.items():
        ratio = ""
        if "ratio_ours_over_this" in e:
            lo, hi = e["ratio_range"]
            ratio = f"{e['ratio_ours_over_this']:.3f} ({lo:.3f}-{hi:.3f})"
        lines.append(
            f"{name:<10} {e['median_s']:9.3f} {e['min_s']:8.3f} {e['max_s']:8.3f} {e['iqr_s']:7.3f} {e['per_image_s']:11.3f}"
            f" {e['images_per_s']:9.2f}   {ratio}"
        )
    lines.append("stages (median seconds, median share of the iteration):")
    for name, e in summary.items():
        parts = ", ".join(f"{k} {v:.3f} ({e['stage_share'][k]:.1%})" for k, v in e["stages_s"].items())
        lines.append(f"  {name}: {parts}")
    for name, e in summary.items():
        share = e["stage_share"]
        if task == "inference":
            lines.append(f"postprocess share {name}: {share['postprocess']:.1%}")
        else:
            core = share["backbone+head forward"] + share["backbone+head backward"]
            tl = sum(share.get(k, 0.0) for k in ("targets", "losses forward", "targets+losses forward", "losses backward"))
            lines.append(
                f"train share {name}: targets+losses (fwd+bwd) {tl:.1%}, outside backbone+head fwd/bwd {1 - core:.1%}"
            )
    return "\n".join(lines)


def benchmark_data(cfg, num_iter: int, warmup: int, log=print) -> Dict:
    """Seconds per batch of Detectron2's training loader over ``DATASETS.TRAIN``."""
    from detectron2.data import build_detection_train_loader

    loader = iter(build_detection_train_loader(cfg))
    times = []
    for i in range(warmup + num_iter):
        start = time.perf_counter()
        next(loader)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            log(f"[benchmark] batch {i + 1 - warmup}: {times[-1]:.4f} s")
    return OrderedDict(
        median_s=statistics.median(times),
        min_s=min(times),
        max_s=max(times),
        iqr_s=_quantile(times, 0.75) - _quantile(times, 0.25),
        per_image_s=statistics.median(times) / cfg.SOLVER.IMS_PER_BATCH,
    )


# ----------------------------------------------------------------------------- CLI
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="", metavar="FILE")
    p.add_argument("--task", choices=("inference", "train", "data"), default="inference")
    p.add_argument("--num-iter", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--compare", default="", help="comma-separated: " + ",".join(KNOWN_MODELS))
    p.add_argument("--input-size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"), help="default 800 1333")
    p.add_argument("--batch-size", type=int, default=1, help="images per iteration (default 1)")
    p.add_argument("--num-gt", type=int, default=30, help="ground-truth boxes per training image (default 30)")
    p.add_argument("--detections", type=int, default=1000, help="confident (location, class) pairs per image for post-processing; 0: raw outputs")
    p.add_argument("--device", default=None, help="cpu or cuda (default: MODEL.DEVICE)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--amp", action="store_true", help="autocast (bfloat16 on CPU, float16 on CUDA)")
    p.add_argument("--channels-last", action="store_true", help="run every model in channels-last (NHWC) memory format")
    p.add_argument(
        "--optimize",
        choices=("ours", "all", "none"),
        default="ours",
        help="inference: apply TEST.FOLD_BATCHNORM / TEST.MEMORY_FORMAT to our model only (default, "
        "each model as its library runs it), to every model (like for like), or to none",
    )
    p.add_argument(
        "--timer",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time (default); cpu: this process's CPU time (process_time), robust to other jobs "
        "on a shared CPU, best with --threads 1 (CPU device only)",
    )
    p.add_argument("--flops", action="store_true", help="also count each model's inference GFLOPs (one untimed forward)")
    p.add_argument("--json", default="", metavar="FILE", help="also write the summary as JSON")
    p.add_argument("--register-coco", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_DIR"))
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ... (after the flags)")
    return p


def main(argv=None) -> Dict:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    opts = list(args.opts)
    if opts and opts[0] == "--opts":
        opts = opts[1:]
    cfg = build_cfg(args.config_file, opts, args.register_coco, freeze=False)
    if args.device:
        cfg.MODEL.DEVICE = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg.freeze()
    device = torch.device(cfg.MODEL.DEVICE)
    if args.timer == "cpu" and device.type != "cpu":
        raise ValueError("--timer cpu measures CPU time: use it with --device cpu")
    clock = time.process_time if args.timer == "cpu" else time.perf_counter
    machine = f"device {device}" + (
        f" ({torch.cuda.get_device_name(device)})"
        if device.type == "cuda"
        else f" ({_cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    )
    header = f"task {args.task}, {machine}, torch {torch.__version__}, config {args.config_file or '(defaults)'}"

    if args.task == "data":
        result = benchmark_data(cfg, args.num_iter, args.warmup)
        print(header)
        print("data loader: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        summary = {"data": result}
    else:
        torch.manual_seed(0)
        names = [n.strip() for n in args.compare.split(",") if n.strip()]
        models = build_models(cfg, names)
        ours = next(iter(models))
        H, W = args.input_size
        optimized = {}
        if args.task == "inference":
            optimized = apply_inference_optimizations(models, cfg, args.optimize)
        if args.channels_last:
            for model in models.values():
                use_channels_last(model)
        if args.task == "inference" and args.detections > 0:
            for model in models.values():
                add_synthetic_logits(model, args.detections, (H, W))
        batch = synthetic_batch(args.batch_size, H, W, args.num_gt, cfg.MODEL.GFOCAL.NUM_CLASSES)
        flops = {name: count_flops(model, batch[:1]) for name, model in models.items()} if args.flops else {}
        records = run_benchmark(models, batch, args.task, args.num_iter, args.warmup, args.amp, clock=clock)
        summary = summarize(records, ours, args.batch_size)
        for name, f in flops.items():
            summary[name]["flops"] = f
        header += (
            f"\ninput {H}x{W}, batch {args.batch_size}, {args.num_iter} timed rounds after {args.warmup} warm-up, "
            f"interleaved, {args.timer} time, amp {args.amp}, channels-last {args.channels_last}"
            + (f", {args.num_gt} gt boxes/image" if args.task == "train" else f", synthetic confident pairs/image {args.detections}")
            + "".join(f"\n  {name}: {how}" for name, how in optimized.items())
        )
        print(format_report(summary, args.task, ours, header))
        for name, f in flops.items():
            ratio = flops[ours]["total_gflops"] / f["total_gflops"]
            print(
                f"GFLOPs {name}: backbone+FPN {f['backbone_gflops']:.1f}, head {f['head_gflops']:.1f}, "
                f"total {f['total_gflops']:.1f} ({ours}/{name} {ratio:.3f})"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": summary}, f, indent=1)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
