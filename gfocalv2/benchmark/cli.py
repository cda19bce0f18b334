"""``python -m gfocalv2.benchmark`` (``gfocalv2-benchmark``): the argument parser and main."""

import argparse
import json
import logging
import os
import platform
import sys
import time
from typing import Dict

import torch

from ..engine import build_cfg
from ..engine.arguments import (
    add_config_file_argument,
    add_opts_argument,
    add_register_coco_argument,
)
from .models import KNOWN_MODELS, apply_inference_optimizations, build_models, use_channels_last
from .report import format_flops, format_report, summarize
from .synthetic import add_synthetic_logits, synthetic_batch
from .timing import benchmark_data, count_flops, run_benchmark

__all__ = ["get_parser", "main"]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def get_parser() -> argparse.ArgumentParser:
    """The benchmark's flags; config overrides go after ``--opts`` (as in every tool) or, as
    before, bare at the end of the command line."""
    doc = sys.modules[__package__].__doc__  # the user documentation of gfocalv2.benchmark
    as_module = os.path.basename(sys.argv[0]) == "__main__.py"  # python -m gfocalv2.benchmark
    p = argparse.ArgumentParser(
        prog="python -m gfocalv2.benchmark" if as_module else None,
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_file_argument(p)
    p.add_argument("--task", choices=("inference", "train", "data"), default="inference")
    p.add_argument("--num-iter", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--compare", default="", help="comma-separated: " + ",".join(KNOWN_MODELS))
    p.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        default=(800, 1333),
        metavar=("H", "W"),
        help="default 800 1333",
    )
    p.add_argument("--batch-size", type=int, default=1, help="images per iteration (default 1)")
    p.add_argument(
        "--num-gt", type=int, default=30, help="ground-truth boxes per training image (default 30)"
    )
    p.add_argument(
        "--detections",
        type=int,
        default=1000,
        help="confident (location, class) pairs per image for post-processing; 0: raw outputs",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: MODEL.DEVICE)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--amp", action="store_true", help="autocast (bfloat16 on CPU, float16 on CUDA)")
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="run every model in channels-last (NHWC) memory format",
    )
    p.add_argument(
        "--optimize",
        choices=("ours", "all", "none"),
        default="ours",
        help="inference: apply TEST.FOLD_BATCHNORM / TEST.MEMORY_FORMAT to our model only "
        "(default, each model as its library runs it), to every model (like for like), or to none",
    )
    p.add_argument(
        "--timer",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time (default); cpu: this process's CPU time (process_time), robust "
        "to other jobs on a shared CPU, best with --threads 1 (CPU device only)",
    )
    p.add_argument(
        "--flops",
        action="store_true",
        help="also count each model's inference GFLOPs (one untimed forward)",
    )
    p.add_argument("--json", default="", metavar="FILE", help="also write the summary as JSON")
    add_register_coco_argument(p)
    add_opts_argument(p)
    p.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        metavar="opts",
        help="config overrides KEY VALUE ... after the flags (the same as --opts)",
    )
    return p


def _parse(argv):
    args = get_parser().parse_args(argv)
    # One list of overrides, under the name it always had (also in the --json file).
    args.opts = list(args.opts) + list(args.overrides)
    del args.overrides
    return args


def main(argv=None) -> Dict:
    """Run the benchmark of ``argv`` (default: the command line); returns the summary."""
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = build_cfg(args.config_file, args.opts, args.register_coco, freeze=False)
    if args.device:
        cfg.MODEL.DEVICE = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    # Timings need no ImageNet weights: a timm backbone is not downloaded (MODEL.WEIGHTS, when
    # given, loads as always).
    cfg.MODEL.TIMM.PRETRAINED = False
    cfg.freeze()
    device = torch.device(cfg.MODEL.DEVICE)
    if args.timer == "cpu" and device.type != "cpu":
        raise ValueError("--timer cpu measures CPU time: use it with --device cpu")
    clock = time.process_time if args.timer == "cpu" else time.perf_counter
    if device.type == "cuda":
        machine = f"device {device} ({torch.cuda.get_device_name(device)})"
    else:
        machine = (
            f"device {device} ({_cpu_name()}, {os.cpu_count()} cores, "
            f"torch threads {torch.get_num_threads()})"
        )
    header = (
        f"task {args.task}, {machine}, torch {torch.__version__}, "
        f"config {args.config_file or '(defaults)'}"
    )

    if args.task == "data":
        result = benchmark_data(cfg, args.num_iter, args.warmup)
        print(header)
        print("data loader: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        summary = {"data": result}
    else:
        summary = _run_models(cfg, args, header, clock)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": summary}, f, indent=1)
    return summary


def _run_models(cfg, args, header: str, clock) -> Dict:
    """The inference or train task: build, prepare, time, print; returns the summary."""
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
    flops = {}
    if args.flops:
        flops = {name: count_flops(model, batch[:1]) for name, model in models.items()}
    records = run_benchmark(
        models, batch, args.task, args.num_iter, args.warmup, args.amp, clock=clock
    )
    summary = summarize(records, ours, args.batch_size)
    for name, f in flops.items():
        summary[name]["flops"] = f
    if args.task == "train":
        inputs = f", {args.num_gt} gt boxes/image"
    else:
        inputs = f", synthetic confident pairs/image {args.detections}"
    header += (
        f"\ninput {H}x{W}, batch {args.batch_size}, {args.num_iter} timed rounds after "
        f"{args.warmup} warm-up, interleaved, {args.timer} time, amp {args.amp}, "
        f"channels-last {args.channels_last}"
        + inputs
        + "".join(f"\n  {name}: {how}" for name, how in optimized.items())
    )
    print(format_report(summary, args.task, ours, header))
    if flops:
        print(format_flops(flops, ours))
    return summary
