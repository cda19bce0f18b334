#!/usr/bin/env python
r"""DigitScenes quickstart (`make demo`): generate the data, train GFocalV2 on CPU, evaluate, draw.

    python projects/DigitScenes/train_digits.py  # GFocalV2, R-18-FPN, ~8 min on 2 CPU cores
    python projects/DigitScenes/train_digits.py --gfl-v1  # the same with GFL (V1)
    python projects/DigitScenes/train_digits.py \
        --config-file projects/DigitScenes/configs/retinanet_R_18_digits.yaml
    python projects/DigitScenes/train_digits.py \
        --eval-only MODEL.WEIGHTS output/digit_scenes/model_final.pth
    python projects/DigitScenes/train_digits.py --resume  # continue from OUTPUT_DIR/last_checkpoint
    python projects/DigitScenes/train_digits.py \
        SOLVER.MAX_ITER 200 OUTPUT_DIR output/quick  # KEY VALUE overrides

It accepts every flag of the top-level train_net.py (--num-gpus, --register-coco, ...).
"""

import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)  # the digit_scenes package next to this script

from gfocalv2 import compat  # noqa: E402

compat.apply()  # first: what this Detectron2 install needs (gfocalv2/compat.py)

import gfocalv2.modeling  # noqa: E402,F401  (registers GFocalV2 and its backbones)

from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from digit_scenes import register_variants  # noqa: E402
from gfocalv2.engine import Trainer, setup_cfg, workflow_argument_parser  # noqa: E402
from gfocalv2.checkpoint import checkpointer_for  # noqa: E402
from gfocalv2.engine.launch import launch_from_args  # noqa: E402

DEFAULT_CONFIG = os.path.join(_HERE, "configs", "gfocalv2_R_18_digits.yaml")


def get_parser():
    parser = workflow_argument_parser(epilog=__doc__)
    parser.set_defaults(config_file=DEFAULT_CONFIG)
    parser.add_argument(
        "--gfl-v1", action="store_true", help="train GFL (V1): MODEL.GFOCAL.DGQP_ENABLED False"
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help="where the dataset is generated/cached "
        "(default: $DETECTRON2_DATASETS/digit_scenes, i.e. ./datasets/digit_scenes)",
    )
    parser.add_argument(
        "--num-vis", type=int, default=8, help="number of val images to draw predictions on"
    )
    parser.add_argument(
        "--vis-threshold", type=float, default=0.3, help="minimum score of drawn detections"
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="train and evaluate GFocalV2, GFL (V1), Detectron2's RetinaNet and FCOS on the same "
        "data, backbone and schedule (one after the other, each in its own process; trailing KEY "
        "VALUE overrides apply to all), then print a table. Outputs go to "
        "output/digit_scenes_compare/<config>/ (or OUTPUT_DIR/<config>).",
    )
    return parser


COMPARE_VARIANTS = [
    ("GFocalV2", "gfocalv2_R_18_digits.yaml"),
    ("GFL (V1)", "gfl_R_18_digits.yaml"),
    ("RetinaNet (Detectron2)", "retinanet_R_18_digits.yaml"),
    ("FCOS (Detectron2)", "fcos_R_18_digits.yaml"),
]


def run_comparison(args):
    """Run each variant in a subprocess and print a markdown table of COCO bbox AP and wall time."""
    import json
    import subprocess

    base_opts = list(args.opts or [])
    out_root = "output/digit_scenes_compare"
    if "OUTPUT_DIR" in base_opts[::2]:
        i = base_opts[::2].index("OUTPUT_DIR") * 2
        out_root = base_opts[i + 1]
        del base_opts[i : i + 2]
    rows = []
    for name, config in COMPARE_VARIANTS:
        out = os.path.join(out_root, os.path.splitext(config)[0])
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--config-file",
            os.path.join(_HERE, "configs", config),
            "--num-vis",
            "0",
        ]
        if args.data_root:
            cmd += ["--data-root", args.data_root]
        cmd += base_opts + ["OUTPUT_DIR", out]
        print(f"[compare] {name}: {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        rc = subprocess.call(cmd)
        minutes = (time.perf_counter() - start) / 60
        bbox = {}
        try:
            with open(os.path.join(out, "metrics.json")) as f:
                evals = [r for r in map(json.loads, filter(str.strip, f)) if "bbox/AP" in r]
            bbox = (
                {k[5:]: v for k, v in evals[-1].items() if k.startswith("bbox/")} if evals else {}
            )
        except OSError:
            pass
        rows.append((name, config, rc, minutes, bbox))
    lines = [
        "| detector | config | AP | AP50 | AP75 | APs | APm | wall time (min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, config, rc, minutes, b in rows:
        if rc != 0 or not b:
            lines.append(f"| {name} | {config} | failed (exit {rc}) | | | | | {minutes:.1f} |")
            continue
        lines.append(
            f"| {name} | {config} | {b['AP']:.1f} | {b['AP50']:.1f} | {b['AP75']:.1f} | "
            f"{b['APs']:.1f} | {b['APm']:.1f} | {minutes:.1f} |"
        )
    table = "\n".join(lines)
    print("\n" + table, flush=True)
    os.makedirs(out_root, exist_ok=True)
    with open(os.path.join(out_root, "comparison.md"), "w") as f:
        f.write(table + "\n")
    print(f"(also written to {os.path.join(out_root, 'comparison.md')})")
    return 0 if all(r[2] == 0 for r in rows) else 1


def _opts_with_variant(args):
    opts = list(args.opts or [])
    if args.gfl_v1:
        extra = ["MODEL.GFOCAL.DGQP_ENABLED", "False"]
        if "OUTPUT_DIR" not in opts[::2]:
            extra += ["OUTPUT_DIR", "output/digit_scenes_gfl"]
        opts = extra + opts
    return opts


def _bbox_results(results):
    """{'AP': .., 'AP50': ..} of the first test dataset from Trainer.test()'s OrderedDict."""
    if not results:
        return {}
    if "bbox" in results:
        return results["bbox"]
    first = next(iter(results.values()))
    return first.get("bbox", {}) if isinstance(first, dict) else {}


def draw_val_predictions(cfg, weights, num, threshold):
    """Draw the predictions of the checkpoint ``weights`` on the first ``num`` val images."""
    from detectron2.data import DatasetCatalog

    from gfocalv2.engine.predictor import Predictor
    from gfocalv2.visualize import metadata_for, visualize_files

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = weights
    cfg.freeze()
    dataset = DatasetCatalog.get(cfg.DATASETS.TEST[0])
    files = [d["file_name"] for d in dataset[:num]]
    out_dir = os.path.join(cfg.OUTPUT_DIR, "visualizations")
    # The scenes are 160 px: draw at 3x so that labels stay legible.
    return visualize_files(
        Predictor(cfg), metadata_for(cfg), files, out_dir, threshold, scale=3.0
    ), out_dir


def _short(path):
    """A path relative to the working directory when it is below it, else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def main(args):
    start = time.perf_counter()
    cfg = setup_cfg(args)
    setup_logger(
        output=cfg.OUTPUT_DIR,
        distributed_rank=comm.get_rank(),
        name="digit_scenes",
        abbrev_name="digits",
    )
    # generates the data at first use
    register_variants(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST), args.data_root)
    output_dir = os.path.abspath(cfg.OUTPUT_DIR)

    if args.eval_only:
        model = Trainer.build_model(cfg)
        # Checked loading: a missing or unreadable file, another architecture or class count
        # is an error that names it.
        checkpointer = checkpointer_for(cfg, model, save_dir=cfg.OUTPUT_DIR)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        weights = cfg.MODEL.WEIGHTS
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
        results = getattr(trainer, "_last_eval_results", None)
        weights = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    if not comm.is_main_process():
        return results

    vis_files, vis_dir = [], None
    if args.num_vis > 0 and weights and os.path.isfile(weights):
        vis_files, vis_dir = draw_val_predictions(cfg, weights, args.num_vis, args.vis_threshold)

    bbox = _bbox_results(results)
    minutes = (time.perf_counter() - start) / 60
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "GFocalV2" and not cfg.MODEL.GFOCAL.DGQP_ENABLED:
        arch = "GFL (V1)"
    backbone = f"R-{cfg.MODEL.RESNETS.DEPTH}"
    if "timm" in cfg.MODEL.BACKBONE.NAME:
        backbone = f"timm {cfg.MODEL.TIMM.NAME}"
    lines = [
        "",
        "=" * 78,
        f"DigitScenes {'evaluation' if args.eval_only else 'training'} done in {minutes:.1f} min: "
        f"{arch}, {backbone}-FPN, "
        f"{cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else 'no test set'}",
    ]
    if bbox:
        lines.append(
            "  COCO bbox AP {AP:.1f} | AP50 {AP50:.1f} | AP75 {AP75:.1f} | "
            "APs {APs:.1f} | APm {APm:.1f}".format(**bbox)
        )
    if not args.eval_only:
        lines.append(f"  checkpoint        {os.path.abspath(weights)}")
    if cfg.DATASETS.TEST:
        lines.append(
            "  predictions       "
            f"{os.path.join(output_dir, 'inference', 'coco_instances_results.json')}"
        )
    lines += [
        f"  metrics / log     {os.path.join(output_dir, 'metrics.json')}, "
        f"{os.path.join(output_dir, 'log.txt')}",
        f"  TensorBoard       tensorboard --logdir {output_dir}",
    ]
    if vis_files:
        lines.append(f"  drawings ({len(vis_files)})      {os.path.abspath(vis_dir)}/")
    config_used = os.path.join(output_dir, "config.yaml")
    from detectron2.data import MetadataCatalog

    test_set = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "digit_scenes_val"
    val_images = MetadataCatalog.get(test_set).get("image_root", "datasets/digit_scenes/val")
    demo_script = _short(os.path.join(_HERE, "demo.py"))  # registers DigitScenes, runs the demo
    data_root = f" --data-root {_short(os.path.abspath(args.data_root))}" if args.data_root else ""
    lines += [
        f"  full config       {config_used}",
        "Run the demo tool on any image with it:",
        f"  python {demo_script} --config-file {_short(config_used)}{data_root} "
        f"--input {_short(os.path.join(val_images, '000000.png'))} "
        f"--output {_short(os.path.join(output_dir, 'demo'))} "
        f"--opts MODEL.WEIGHTS {_short(os.path.abspath(weights))}",
        "=" * 78,
    ]
    print("\n".join(lines), flush=True)
    return results


if __name__ == "__main__":
    args = get_parser().parse_args()
    if args.compare:
        sys.exit(run_comparison(args))
    args.opts = _opts_with_variant(args)

    def generate_data(cfg):  # once, before the processes start (each then reads the cached files)
        register_variants(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST), args.data_root)

    launch_from_args(main, args, prepare=generate_data)
