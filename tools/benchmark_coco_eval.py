#!/usr/bin/env python
"""COCO bbox evaluation time: pycocotools' ``COCOeval`` against faster-coco-eval, as gfocalv2.compat
routes Detectron2's ``COCOEvaluator`` to it when Detectron2 has no compiled ops.

A seeded synthetic set the size of COCO val2017 by default (5000 images, about 35k ground-truth
boxes, 100 detections per image = 500k, 80 classes) is loaded once into pycocotools ``COCO``
objects (``loadRes``, as ``COCOEvaluator`` does, not timed). Then, for ``--rounds`` rounds, each
evaluator runs ``evaluate()``, ``accumulate()`` and ``summarize()`` on it, the two in an order
that alternates from round to round. Printed: the median (min-max) wall and CPU time of each,
the ratio of the medians, and whether the 12 stats are identical (exit status 1 if any differs
by more than 1e-9).

    python tools/benchmark_coco_eval.py                    # COCO-val-sized, 3 rounds
    python tools/benchmark_coco_eval.py --images 500 --rounds 5   # 10x smaller
"""

import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="images (COCO val2017: 5000)")
    parser.add_argument(
        "--boxes-per-image", type=float, default=7.0, help="mean ground-truth boxes per image"
    )
    parser.add_argument(
        "--detections-per-image", type=int, default=100, help="detections per image"
    )
    parser.add_argument("--classes", type=int, default=80, help="categories")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def make_synthetic_set(images, boxes_per_image, detections_per_image, classes, seed=0):
    """A COCO ground-truth dict and a COCO results list (bbox), seeded.

    Ground truth: Poisson(``boxes_per_image``) boxes per image (at least 1), sides log-uniform in
    4-400 px of a 640x480 image (small, medium and large), 1 % crowd. Detections: 60 % jittered
    copies of the image's ground truth (15 % of them with a random class), 40 % random boxes of
    random classes; scores continuous (no ties), higher for the copies on average.
    """
    rng = np.random.default_rng(seed)
    width, height = 640.0, 480.0
    dataset = {
        "images": [
            {"id": i + 1, "file_name": f"{i + 1:06d}.jpg", "width": 640, "height": 480}
            for i in range(images)
        ],
        "categories": [{"id": c, "name": f"class_{c}"} for c in range(1, classes + 1)],
    }
    gt_count = np.maximum(rng.poisson(boxes_per_image, images), 1)
    gt_image = np.repeat(np.arange(1, images + 1), gt_count)
    n = len(gt_image)
    side = np.exp(rng.uniform(np.log(4), np.log(400), n))
    wh = np.minimum(side[:, None] * rng.uniform(0.6, 1.6, (n, 2)), [width, height])
    xy = rng.uniform(0, 1, (n, 2)) * ([width, height] - wh)
    gt_class = rng.integers(1, classes + 1, n)
    crowd = (rng.random(n) < 0.01).astype(int)
    gt_box = np.concatenate([xy, wh], 1).tolist()
    dataset["annotations"] = [
        {
            "id": k + 1,
            "image_id": int(gt_image[k]),
            "category_id": int(gt_class[k]),
            "bbox": gt_box[k],
            "area": float(wh[k, 0] * wh[k, 1]),
            "iscrowd": int(crowd[k]),
        }
        for k in range(n)
    ]

    m = images * detections_per_image
    dt_image = np.repeat(np.arange(1, images + 1), detections_per_image)
    first_gt = np.concatenate([[0], np.cumsum(gt_count)[:-1]])
    copy = rng.random(m) < 0.6
    source = first_gt[dt_image - 1] + rng.integers(0, gt_count[dt_image - 1])  # a gt of the image
    side = np.exp(rng.uniform(np.log(4), np.log(400), m))
    dt_wh = np.minimum(side[:, None] * rng.uniform(0.6, 1.6, (m, 2)), [width, height])
    dt_xy = rng.uniform(0, 1, (m, 2)) * ([width, height] - dt_wh)
    dt_class = rng.integers(1, classes + 1, m)
    jitter_wh = wh[source] * np.exp(rng.normal(0, 0.2, (m, 2)))
    jitter_xy = xy[source] + rng.normal(0, 0.12, (m, 2)) * wh[source]
    dt_wh = np.where(copy[:, None], jitter_wh, dt_wh)
    dt_xy = np.where(copy[:, None], jitter_xy, dt_xy)
    keep_class = copy & (rng.random(m) < 0.85)
    dt_class = np.where(keep_class, gt_class[source], dt_class)
    score = np.where(copy, rng.beta(4, 2, m), rng.beta(2, 4, m))
    dt_box = np.concatenate([dt_xy, dt_wh], 1).tolist()
    results = [
        {
            "image_id": int(dt_image[k]),
            "category_id": int(dt_class[k]),
            "bbox": dt_box[k],
            "score": float(score[k]),
        }
        for k in range(m)
    ]
    return dataset, results


def run_once(evaluator_class, coco_gt, coco_dt):
    """(evaluator, {phase: (wall s, CPU s)}) of evaluate, accumulate, summarize (output hidden)."""
    phases = {}
    with contextlib.redirect_stdout(io.StringIO()):
        wall, cpu = time.perf_counter(), time.process_time()
        ev = evaluator_class(coco_gt, coco_dt, "bbox")
        for phase in ("evaluate", "accumulate", "summarize"):
            getattr(ev, phase)()
            now_wall, now_cpu = time.perf_counter(), time.process_time()
            phases[phase] = (now_wall - wall, now_cpu - cpu)
            wall, cpu = now_wall, now_cpu
    return ev, phases


def main(argv=None):
    args = parse_args(argv)
    from importlib.metadata import version

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from gfocalv2 import compat

    faster = compat._faster_coco_eval_class()  # what Detectron2's COCOEvaluator gets without _C
    if faster is None:
        sys.exit("faster-coco-eval is not installed: pip install faster-coco-eval")
    evaluators = {"pycocotools": COCOeval, "faster-coco-eval": faster}

    tic = time.perf_counter()
    dataset, results = make_synthetic_set(
        args.images, args.boxes_per_image, args.detections_per_image, args.classes, args.seed
    )
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
    print(
        f"synthetic set: {len(dataset['images'])} images, {len(dataset['annotations'])} boxes "
        f"({sum(a['iscrowd'] for a in dataset['annotations'])} crowd), {len(results)} detections, "
        f"{len(dataset['categories'])} classes; built and loaded in "
        f"{time.perf_counter() - tic:.1f} s (not timed below)"
    )
    print(
        f"pycocotools {version('pycocotools')} "
        f"| faster-coco-eval {version('faster-coco-eval')} | Python {platform.python_version()} "
        f"| {os.cpu_count()} CPUs | load average {os.getloadavg()[0]:.2f} at start"
    )

    times = {name: [] for name in evaluators}
    phase_times = {name: [] for name in evaluators}
    stats = {}
    names = list(evaluators)
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            ev, phases = run_once(evaluators[name], coco_gt, coco_dt)
            total = tuple(sum(p[i] for p in phases.values()) for i in (0, 1))
            times[name].append(total)
            phase_times[name].append(phases)
            stats[name] = np.asarray(ev.stats)
            print(
                f"round {r + 1} {name:>16}: {total[0]:6.2f} s wall, {total[1]:6.2f} s CPU "
                f"(evaluate {phases['evaluate'][0]:.2f}, accumulate {phases['accumulate'][0]:.2f},"
                f" summarize {phases['summarize'][0]:.3f} s wall)",
                flush=True,
            )
            del ev

    print(f"\nevaluate + accumulate + summarize, median (min-max) of {args.rounds} rounds:")
    medians = {}
    for name in names:
        wall = [t[0] for t in times[name]]
        cpu = [t[1] for t in times[name]]
        medians[name] = (statistics.median(wall), statistics.median(cpu))
        print(
            f"  {name:>16}: {medians[name][0]:6.2f} s wall ({min(wall):.2f}-{max(wall):.2f}), "
            f"{medians[name][1]:6.2f} s CPU ({min(cpu):.2f}-{max(cpu):.2f})"
        )
    ratio_wall = medians["pycocotools"][0] / medians["faster-coco-eval"][0]
    ratio_cpu = medians["pycocotools"][1] / medians["faster-coco-eval"][1]
    print(f"  faster-coco-eval is {ratio_wall:.1f}x faster (wall), {ratio_cpu:.1f}x (CPU)")

    diff = np.abs(stats["pycocotools"] - stats["faster-coco-eval"]).max()
    identical = np.array_equal(stats["pycocotools"], stats["faster-coco-eval"])
    print("12 stats (pycocotools):", " ".join(f"{s:.4f}" for s in stats["pycocotools"]))
    print("12 stats identical" if identical else f"12 stats differ: max abs difference {diff:.3g}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0 if diff <= 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
