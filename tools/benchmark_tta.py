#!/usr/bin/env python
"""COCO AP and time per image of a trained model without and with test-time augmentation.

    python tools/benchmark_tta.py --config-file CONFIG --dataset NAME \
        [--register-coco NAME JSON IMAGE_DIR] [--rounds 1] [--threads 2] \
        [--setting NAME MIN_SIZES MAX_SIZE FLIP ...] [KEY VALUE ...]   # MODEL.WEIGHTS W ...

Each setting is evaluated on the whole dataset as ``train_net.py --eval-only`` does (the
model with the inference rewrites of ``TEST.FOLD_BATCHNORM`` / ``TEST.MEMORY_FORMAT``,
Detectron2's ``COCOEvaluator``): "plain" is the model alone (``Trainer.test``), the others
``Trainer.test_with_TTA``'s wrapper with ``TEST.AUG.MIN_SIZES`` / ``MAX_SIZE`` / ``FLIP``.
Without ``--setting``, the settings are relative to the config's test size s (short side) and
m (long side cap): flip; (s, 1.2 s); (0.8 s, s, 1.2 s); each of these two with flip too
(MAX_SIZE 1.2 m). Time per image: the evaluation's wall time over the images (loading and
resizing included), the median over ``--rounds`` rounds (settings interleaved), and as a ratio to
"plain" in the same round. Prints one markdown table.
"""

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from gfocalv2 import compat

compat.apply()  # before Detectron2 is imported (gfocalv2/compat.py)

import gfocalv2.modeling  # noqa: F401  (registers GFocalV2)
import torch
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model

from gfocalv2.checkpoint import load_weights
from gfocalv2.engine import Trainer, build_cfg
from gfocalv2.engine.arguments import add_config_file_argument, add_register_coco_argument
from gfocalv2.evaluation import build_coco_evaluator
from gfocalv2.modeling.inference_optimization import optimized_copy
from gfocalv2.test_time_augmentation import GFocalV2WithTTA, original_size_inputs


def default_settings(cfg):
    s, m = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
    up, down, m_up = round(1.2 * s), round(0.8 * s), round(1.2 * m)
    return [
        ("plain", None, None, None),
        ("flip", (s,), m, True),
        ("2 scales", (s, up), m_up, False),
        ("3 scales", (down, s, up), m_up, False),
        ("2 scales + flip", (s, up), m_up, True),
        ("3 scales + flip", (down, s, up), m_up, True),
    ]


def parse_setting(name, min_sizes, max_size, flip):
    sizes = tuple(int(v) for v in min_sizes.strip("()").split(",") if v.strip())
    return (name, sizes, int(max_size), flip.lower() in ("1", "true", "yes"))


def evaluate(cfg, model, dataset, setting, output_dir):
    """(AP results dict, seconds, number of images) of one setting."""
    name, min_sizes, max_size, flip = setting
    if min_sizes is None:
        run_cfg, runner = cfg, model
    else:
        cfg = cfg.clone()
        cfg.defrost()
        cfg.TEST.AUG.ENABLED = True
        cfg.TEST.AUG.MIN_SIZES = min_sizes
        cfg.TEST.AUG.MAX_SIZE = max_size
        cfg.TEST.AUG.FLIP = flip
        cfg.freeze()
        run_cfg, runner = original_size_inputs(cfg), GFocalV2WithTTA(cfg, model)
    loader = Trainer.build_test_loader(run_cfg, dataset)
    evaluator = build_coco_evaluator(cfg, dataset, output_dir)
    start = time.perf_counter()
    results = inference_on_dataset(runner, loader, evaluator)
    return results["bbox"], time.perf_counter() - start, len(loader.dataset)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_config_file_argument(p, required=True)
    p.add_argument(
        "--dataset", required=True, help="a registered dataset (e.g. by --register-coco)"
    )
    add_register_coco_argument(p)
    p.add_argument(
        "--setting",
        nargs=4,
        action="append",
        default=[],
        metavar=("NAME", "MIN_SIZES", "MAX_SIZE", "FLIP"),
        help='e.g. --setting "2 scales" "(160,192)" 230 false; "plain" is always run',
    )
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg = build_cfg(args.config_file, args.opts, args.register_coco)
    model = build_model(cfg)
    load_weights(model, cfg)
    model = optimized_copy(model, cfg).eval()
    settings = default_settings(cfg)
    if args.setting:
        settings = settings[:1] + [parse_setting(*s) for s in args.setting]
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    logging.getLogger("d2").setLevel(logging.WARNING)

    times = {s[0]: [] for s in settings}
    ratios = {s[0]: [] for s in settings}
    aps = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            plain_time = None
            for setting in settings:
                res, seconds, n = evaluate(cfg, model, args.dataset, setting, tmp)
                per_image = seconds / n
                plain_time = per_image if setting[0] == "plain" else plain_time
                times[setting[0]].append(per_image)
                ratios[setting[0]].append(per_image / plain_time)
                aps[setting[0]] = res
                line = f"round {r + 1} {setting[0]:>16}: AP {res['AP']:.2f}"
                print(f"{line}  {per_image * 1e3:.1f} ms/image", flush=True)

    print(
        f"\n{args.dataset} ({n} images), {args.config_file}, "
        f"test size {cfg.INPUT.MIN_SIZE_TEST}/{cfg.INPUT.MAX_SIZE_TEST}, "
        f"{args.threads} thread(s), {args.rounds} round(s)\n"
    )
    print(
        "| setting | MIN_SIZES | MAX_SIZE | FLIP | AP | AP50 | AP75 | APs | APm | APl "
        "| ms / image | x plain |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, min_sizes, max_size, flip in settings:
        res = aps[name]
        cells = [f"{res[k]:.2f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
        aug = [str(min_sizes or "-"), str(max_size or "-"), "-" if flip is None else str(flip)]
        ms, ratio = statistics.median(times[name]) * 1e3, statistics.median(ratios[name])
        print(f"| {name} | {' | '.join(aug)} | {' | '.join(cells)} | {ms:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
