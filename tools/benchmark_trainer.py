#!/usr/bin/env python
"""Median training step of gfocalv2's Trainer against Detectron2's own DefaultTrainer on the
same model, config and data, in one process, rounds interleaved (so both see the same machine
load).

    python tools/benchmark_trainer.py \
        [--config-file configs/COCO-Detection/gfocalv2_R_50_FPN_1x.yaml] [--size 320] \
        [--iters 20] [--warmup 3] [--rounds 3] [--threads 2] [KEY VALUE ...]

The data is a generated DigitScenes set (COCO format, cached under --data-root). Both trainers
load it with their own loaders (the mapping in one worker process each), train from the same
seed, and time each iteration from one ``before_step`` to the next after ``--warmup`` iterations.
Prints each round's median and the ratio of the medians (gfocalv2 / Detectron2).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # projects.DigitScenes (the data), run from anywhere

from gfocalv2 import compat

compat.apply()  # before Detectron2 is imported (gfocalv2/compat.py)

import torch
from detectron2.engine import DefaultTrainer, HookBase
from detectron2.utils.env import seed_all_rng

from gfocalv2.engine import Trainer, build_cfg, register_coco_datasets
from projects.DigitScenes.digit_scenes import prepare


class Detectron2Trainer(DefaultTrainer):
    """Detectron2's DefaultTrainer as its tools/train_net.py uses it."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        from detectron2.evaluation import COCOEvaluator

        return COCOEvaluator(dataset_name, output_dir=os.path.join(cfg.OUTPUT_DIR, "inference"))


class StepTimes(HookBase):
    def __init__(self):
        self.starts = []

    def before_step(self):
        self.starts.append(time.perf_counter())

    def after_train(self):
        self.starts.append(time.perf_counter())


def step_times(trainer_class, cfg, warmup):
    seed_all_rng(cfg.SEED)
    trainer = trainer_class(cfg)
    timer = StepTimes()
    trainer.register_hooks([timer])
    trainer.resume_or_load(resume=False)
    trainer.train()
    steps = [b - a for a, b in zip(timer.starts, timer.starts[1:])]
    return steps[warmup:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config-file",
        default=os.path.join(REPO, "configs", "COCO-Detection", "gfocalv2_R_50_FPN_1x.yaml"),
    )
    parser.add_argument("--size", type=int, default=320, help="training image size (pixels)")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-root", default=os.path.join(tempfile.gettempdir(), "bench_digits"))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    root = prepare(args.data_root, {"num_train": 64, "num_val": 8, "image_size": args.size})
    register_coco_datasets(
        [
            ["bench_train", os.path.join(root, "train.json"), os.path.join(root, "train")],
            ["bench_val", os.path.join(root, "val.json"), os.path.join(root, "val")],
        ]
    )
    out = tempfile.mkdtemp(prefix="bench_trainer_")
    opts = [
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.GFOCAL.NUM_CLASSES", "10",
        "DATASETS.TRAIN", "('bench_train',)", "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0",
        "INPUT.MIN_SIZE_TRAIN", f"({args.size},)", "INPUT.MAX_SIZE_TRAIN", str(args.size),
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", str(args.iters + args.warmup),
        "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", "100000",
        "DATALOADER.NUM_WORKERS", "1", "SEED", "0", "OUTPUT_DIR", out, *args.opts,
    ]  # fmt: skip
    cfg = build_cfg(args.config_file, opts)
    print(
        f"{os.path.relpath(args.config_file, REPO)} at {args.size} px, batch 2, "
        f"{args.threads} thread(s), {args.iters} timed iterations x {args.rounds} rounds"
    )
    medians = {"gfocalv2 Trainer": [], "Detectron2 DefaultTrainer": []}
    for r in range(args.rounds):
        for name, trainer_class in (
            ("gfocalv2 Trainer", Trainer),
            ("Detectron2 DefaultTrainer", Detectron2Trainer),
        ):
            median = statistics.median(step_times(trainer_class, cfg, args.warmup))
            medians[name].append(median)
            print(f"round {r + 1}  {name:<26} median step {median * 1000:8.1f} ms", flush=True)
    ours = statistics.median(medians["gfocalv2 Trainer"])
    theirs = statistics.median(medians["Detectron2 DefaultTrainer"])
    print(
        f"median of the rounds: gfocalv2 {ours * 1000:.1f} ms, Detectron2 {theirs * 1000:.1f} ms, "
        f"ratio {ours / theirs:.3f}"
    )


if __name__ == "__main__":
    main()
