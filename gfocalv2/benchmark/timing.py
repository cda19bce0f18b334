"""Timing: a stopwatch per stage, one inference or training iteration split into stages
(the backward pass split at the head outputs), the interleaved rounds over the models, the
data loader, and FLOPs."""

import contextlib
import statistics
import time
from collections import OrderedDict
from typing import Callable, Dict, List

import torch
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.utils.events import EventStorage
from torch import nn

from .report import quantile

__all__ = [
    "Stopwatch",
    "inference_step",
    "split_backward",
    "train_step",
    "count_flops",
    "run_benchmark",
    "benchmark_data",
]


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
        grads, param_grads = grads[: len(outputs)], grads[len(outputs) :]
        for p, g in zip(params, param_grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
    with sw.stage("backbone+head backward"):
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


def train_step(
    model: nn.Module, batch: List[Dict], optimizer: torch.optim.Optimizer, sw: Stopwatch
):
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
        order = (
            "preprocess",
            "backbone+head forward",
            "targets",
            "losses forward",
            "losses backward",
        )
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
    return OrderedDict(
        backbone_gflops=backbone / 1e9,
        head_gflops=head / 1e9,
        total_gflops=(backbone + head) / 1e9,
    )


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


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
            order = names[r % len(names) :] + names[: r % len(names)]
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
                round_name = r + 1 - warmup if r >= warmup else "warm-up"
                log(f"[benchmark] round {round_name} {name}: {times['total']:.3f} s")
    return records


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
        iqr_s=quantile(times, 0.75) - quantile(times, 0.25),
        per_image_s=statistics.median(times) / cfg.SOLVER.IMS_PER_BATCH,
    )
