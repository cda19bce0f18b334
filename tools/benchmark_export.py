#!/usr/bin/env python
r"""Speed of the exported ONNX graph (onnxruntime) against the PyTorch model, with and without
detections, and what post-processing costs inside the exported graph.

    python tools/benchmark_export.py \
        --config-file configs/COCO-Detection/gfocalv2_R_50_FPN_1x.yaml \
        --size 800 1216 --rounds 5 --threads 1 2

The model has random weights. "no detections": as initialized (every score near the prior,
0.01: nothing above the 0.05 threshold). "detections": the classification layer is set so that
scores vary from location to location and class to class, as a trained model's do, and a few
thousand (location, class) pairs score above 0.05, giving 100 detections per image after NMS.
For each case and thread count, PyTorch (the model as the Predictor runs it, with the inference
rewrites) and onnxruntime run the same image in alternation, ``--rounds`` times after one
warm-up each; medians are reported, and the ratio onnxruntime / PyTorch. onnxruntime's profiler
then gives the share of the graph's time spent in post-processing (the NonMaxSuppression, TopK
and every operator after the head's last convolution). Also printed: the export time and size.
"""

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort
import torch

from gfocalv2 import compat

compat.apply()  # before Detectron2 is imported (gfocalv2/compat.py)

import gfocalv2.modeling  # noqa: F401  (registers GFocalV2)
from detectron2.modeling import build_model
from gfocalv2.benchmark.synthetic import trained_like_scores
from gfocalv2.engine import build_cfg
from gfocalv2.export import export_onnx, min_input_size
from gfocalv2.modeling.inference_optimization import optimize_for_inference

POST_OPS = {"NonMaxSuppression", "TopK", "NonZero", "GatherND", "ScatterND"}


def time_pytorch(model, image, threads):
    torch.set_num_threads(threads)
    start = time.perf_counter()
    with torch.no_grad():
        out = model([{"image": image[0]}])[0]["instances"]
    return time.perf_counter() - start, len(out)


def session(path, threads, profile_dir=None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if profile_dir:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(profile_dir, "ort")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def time_onnx(sess, image, threshold):
    feeds = {"image": image.numpy(), "score_threshold": np.asarray(threshold, np.float32)}
    start = time.perf_counter()
    out = sess.run(None, feeds)
    return time.perf_counter() - start, len(out[0])


def post_processing_share(path, image, threshold, threads):
    """Share of the graph's operator time in NMS/TopK/NonZero/... and in NMS alone."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = session(path, threads, tmp)
        for _ in range(3):
            time_onnx(sess, image, threshold)
        trace = json.load(open(sess.end_profiling()))
    nodes = [e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    total = sum(e["dur"] for e in nodes)
    by_type = {}
    for e in nodes:
        op = e["args"].get("op_name", "?")
        by_type[op] = by_type.get(op, 0) + e["dur"]
    post = sum(v for k, v in by_type.items() if k in POST_OPS)
    return post / total, by_type.get("NonMaxSuppression", 0) / total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", default="configs/COCO-Detection/gfocalv2_R_50_FPN_1x.yaml")
    p.add_argument("--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)

    # random weights: no pretrained backbone to download
    cfg = build_cfg(args.config_file, ["MODEL.DEVICE", "cpu", "MODEL.TIMM.PRETRAINED", "False"])
    torch.manual_seed(0)
    image = torch.rand(1, 3, *args.size) * 255
    threshold = cfg.MODEL.GFOCAL.SCORE_THRESH_TEST
    print(f"{args.config_file}, input {args.size[0]}x{args.size[1]}, torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in ("no detections", "detections"):
            model = build_model(cfg).eval()
            if case == "detections":
                trained_like_scores(model)
            model = optimize_for_inference(model, cfg)  # the Predictor's model
            export_model = optimize_for_inference(copy.deepcopy(model), cfg, "contiguous")
            path = os.path.join(tmp, f"{case.replace(' ', '_')}.onnx")
            start = time.perf_counter()
            export_onnx(export_model, image[..., : min_input_size(model, "pt2") * 2, :], path)
            export_s = time.perf_counter() - start
            size_mb = os.path.getsize(path) / 1e6
            for threads in args.threads:
                sess = session(path, threads)
                time_pytorch(model, image, threads)  # warm-up
                time_onnx(sess, image, threshold)
                t_torch, t_onnx = [], []
                for _ in range(args.rounds):
                    t, n_torch = time_pytorch(model, image, threads)
                    t_torch.append(t)
                    t, n_onnx = time_onnx(sess, image, threshold)
                    t_onnx.append(t)
                post, nms = post_processing_share(path, image, threshold, threads)
                row = {
                    "case": case, "threads": threads, "detections": (n_torch, n_onnx),
                    "pytorch_s": statistics.median(t_torch), "onnx_s": statistics.median(t_onnx),
                    "post_share": post, "nms_share": nms, "export_s": export_s, "size_mb": size_mb,
                }  # fmt: skip
                row["ratio"] = row["onnx_s"] / row["pytorch_s"]
                rows.append(row)
                print(
                    f"{case:13s} threads {threads}: detections {n_torch}/{n_onnx} (PyTorch/ONNX), "
                    f"PyTorch {row['pytorch_s']:.3f} s, onnxruntime {row['onnx_s']:.3f} s, "
                    f"ratio {row['ratio']:.2f}; post-processing {post:.1%} of the graph "
                    f"(NMS {nms:.1%}); export {export_s:.0f} s, {size_mb:.0f} MB",
                    flush=True,
                )
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
