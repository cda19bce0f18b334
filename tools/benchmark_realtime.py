#!/usr/bin/env python
r"""Latency of exported detectors as a deployed application sees it: each config exported to ONNX
and run by :class:`gfocalv2.runtime.OnnxPredictor` (resize, graph, boxes back to the image) on
one 640x480 image, with the same number of onnxruntime threads; plus parameters and FLOPs.

    python tools/benchmark_realtime.py --rounds 9 --threads 2 \
        --config-files configs/COCO-Detection/gfocalv2_R_50_FPN_1x.yaml \
                       configs/COCO-Detection/gfocalv2_lite_lcnet_FPN_320.yaml \
                       configs/COCO-Detection/gfocalv2_timm_convnext_tiny_FPN_1x.yaml

The first config is the reference: every other is reported as its speed-up over it (reference
median / median), from the same run. The models have random weights whose classification layer
is set to give scores like a trained model's (100 detections for the R-50 at 800 px; see
``gfocalv2.benchmark.synthetic.trained_like_scores``; BatchNorm statistics set from the input
as training would have set them, ``calibrate_batch_norms``), so NMS has real work. Rounds interleave
the configs (one call of each per round, after two warm-up calls each; a pause before each call
lets the previous session's spinning threads stop), so that a change in the machine's load hits
all of them alike; medians are reported, and the median of the per-round
speed-ups. FLOPs: one PyTorch inference at the size the predictor resizes the image to,
counted by ``torch.utils.flop_counter`` (convolutions and matrix products, multiply-add = 2).
Run it on an otherwise idle machine.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from gfocalv2 import compat

compat.apply()  # before Detectron2 is imported (gfocalv2/compat.py)

import gfocalv2.modeling  # noqa: F401  (registers GFocalV2)
from detectron2.modeling import build_model
from gfocalv2.benchmark.synthetic import calibrate_batch_norms, trained_like_scores
from gfocalv2.benchmark.timing import count_flops
from gfocalv2.engine import build_cfg
from gfocalv2.export import class_names_for, export_metadata, export_onnx
from gfocalv2.modeling.inference_optimization import optimize_for_inference
from gfocalv2.runtime import OnnxPredictor, resized_shape

DEFAULT_CONFIGS = [
    "configs/COCO-Detection/gfocalv2_R_50_FPN_1x.yaml",
    "configs/COCO-Detection/gfocalv2_lite_lcnet_FPN_320.yaml",
    "configs/COCO-Detection/gfocalv2_timm_convnext_tiny_FPN_1x.yaml",
]


def exported_predictor(config_file, opts, image_hw, threads, directory):
    """(OnnxPredictor, facts) for ``config_file`` with random, trained-like weights."""
    cfg = build_cfg(config_file, ["MODEL.DEVICE", "cpu", "MODEL.TIMM.PRETRAINED", "False", *opts])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    h, w = resized_shape(*image_hw, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    calibrate_batch_norms(model, torch.rand(3, h, w) * 255)
    trained_like_scores(model)
    flops = count_flops(model, [{"image": torch.rand(3, h, w) * 255}])["total_gflops"]
    model = optimize_for_inference(model, cfg, "contiguous")
    path = os.path.join(directory, os.path.basename(config_file).replace(".yaml", ".onnx"))
    start = time.perf_counter()
    example = torch.rand(1, 3, max(h, 160), max(w, 192)) * 255
    export_onnx(model, example, path, export_metadata(cfg, class_names_for(cfg), model))
    facts = {
        "params_m": params / 1e6,
        "gflops": flops,
        "input": f"{w}x{h}",
        "export_s": time.perf_counter() - start,
    }
    return OnnxPredictor(path, num_threads=threads), facts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-files", nargs="+", default=DEFAULT_CONFIGS)
    p.add_argument("--image-size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument(
        "--opts", nargs="*", default=[], help="config overrides (KEY VALUE ...) for every config"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*args.image_size, 3), dtype=np.uint8)
    print(
        f"image {args.image_size[1]}x{args.image_size[0]}, onnxruntime threads {args.threads}, "
        f"{args.rounds} rounds, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        predictors, facts = [], []
        for config in args.config_files:
            predictor, fact = exported_predictor(
                config, args.opts, args.image_size, args.threads, tmp
            )
            predictors.append(predictor)
            facts.append(fact)
            print(f"exported {config} in {fact['export_s']:.0f} s", flush=True)
        for predictor in predictors:  # warm-up
            predictor(image)
            predictor(image)
        times = [[] for _ in predictors]
        detections = [0] * len(predictors)
        for _ in range(args.rounds):
            for i, predictor in enumerate(predictors):
                # onnxruntime's threads spin for a while after a run: let the previous
                # session's stop, or they take the cores from this one.
                time.sleep(0.2)
                start = time.perf_counter()
                detections[i] = len(predictor(image)["boxes"])
                times[i].append(time.perf_counter() - start)
    reference = statistics.median(times[0])
    print(
        f"\n{'config':58s} {'input':>8s} {'params':>8s} {'GFLOPs':>8s} {'ms':>9s} {'speed-up':>9s}"
    )
    rows = []
    for config, fact, t, n in zip(args.config_files, facts, times, detections):
        median = statistics.median(t)
        per_round = statistics.median(r / x for r, x in zip(times[0], t))
        row = dict(fact, config=config, ms=1000 * median, speedup=reference / median,
                   speedup_per_round=per_round, detections=n)  # fmt: skip
        rows.append(row)
        print(
            f"{os.path.basename(config):58s} {fact['input']:>8s} {fact['params_m']:7.1f}M "
            f"{fact['gflops']:8.2f} {row['ms']:9.1f} {row['speedup']:8.1f}x "
            f"(per round {per_round:.1f}x, {n} detections)"
        )
    print(f"load at the end {os.getloadavg()[0]:.2f}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
