#!/usr/bin/env python
r"""Does the DGQP help? GFocalV2 against GFL (V1), several seeds, paired (`make dgqp-study`).

    python tools/dgqp_study.py                      # 5 seeds x 2 detectors x 2 datasets
    python tools/dgqp_study.py --seeds 0 1 2 --datasets digit_scenes_crowded \
        --output output/dgqp_long SOLVER.MAX_ITER 1200 SOLVER.STEPS "(900,1100)"
    python tools/dgqp_study.py --datasets mydata \
        --register-coco mydata_train train.json train/ --register-coco mydata_val val.json val/ \
        --config-file my_gfocalv2.yaml                # your data: mydata_train / mydata_val

Each run is ``projects/DigitScenes/train_digits.py`` with one detector's config (GFocalV2's and
the same with ``MODEL.GFOCAL.DGQP_ENABLED False``), ``DATASETS.TRAIN (<dataset>_train,)``,
``DATASETS.TEST (<dataset>_val,)`` and ``SEED <seed>``: the seed fixes the model's
initialization and the order of the training images, so both detectors of a seed see the same
data in the same order. Runs go to ``OUTPUT/<dataset>/<detector>/seed<seed>``; a run whose
predictions exist and whose command was the same is not trained again (an interrupted study
continues where it stopped). ``--jobs`` runs train side by side, the CPU threads shared.

Per run: COCO AP, AP50 and AP75, and the Pearson / Spearman correlation between the score and
the IoU with the best ground truth (detections with IoU >= 0.5), as ``python -m gfocalv2.analyze``
computes them. Per dataset: each detector's mean and standard deviation over the seeds, the mean
of the paired differences (GFocalV2 - GFL (V1), seed by seed) with a 95 % paired bootstrap
interval, the number of seeds where GFocalV2 leads, and the exact two-sided sign-flip
(permutation) p-value of the mean difference. Written to ``OUTPUT/report.md`` and
``OUTPUT/report.json``.
"""

import argparse
import contextlib
import io
import itertools
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "projects", "DigitScenes"))  # the digit_scenes package

from gfocalv2 import compat  # noqa: E402

compat.apply()  # before Detectron2 is imported (gfocalv2/compat.py)

from gfocalv2.analyze.cli import _jsonable, analyze_results  # noqa: E402
from gfocalv2.analyze.coco import load_ground_truth, load_results  # noqa: E402
from gfocalv2.data.datasets import register_coco_datasets  # noqa: E402
from gfocalv2.engine.arguments import add_register_coco_argument  # noqa: E402

TRAIN_SCRIPT = os.path.join(REPO, "projects", "DigitScenes", "train_digits.py")
CONFIGS = os.path.join(REPO, "projects", "DigitScenes", "configs")
#: (key, label, extra overrides): the first is compared against the second.
DETECTORS = (
    ("gfocalv2", "GFocalV2", []),
    ("gfl", "GFL (V1)", ["MODEL.GFOCAL.DGQP_ENABLED", "False"]),
)
METRICS = ("ap", "ap50", "ap75", "pearson", "spearman")
RESULTS = os.path.join("inference", "coco_instances_results.json")
STAMP = "study_run.json"
CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")

logger = logging.getLogger("dgqp_study")


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["digit_scenes", "digit_scenes_crowded"],
        help="each NAME trains on NAME_train and is evaluated on NAME_val (DigitScenes variants "
        "are generated at first use; other names must be registered with --register-coco)",
    )
    parser.add_argument(
        "--config-file",
        default=os.path.join(CONFIGS, "gfocalv2_R_18_digits.yaml"),
        help="the GFocalV2 config; GFL (V1) is the same with MODEL.GFOCAL.DGQP_ENABLED False",
    )
    parser.add_argument("--output", default="output/dgqp_study")
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="runs trained side by side, each with cpu_count / jobs threads (on 2 cores, two "
        "1-thread runs train 1.4x faster than one after the other)",
    )
    parser.add_argument(
        "--data-root", default=None, help="the DigitScenes folder (as train_digits)"
    )
    parser.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples")
    parser.add_argument(
        "--curve",
        action="store_true",
        help="also evaluate each run's intermediate checkpoints (SOLVER.CHECKPOINT_PERIOD) and "
        "report the paired difference along training",
    )
    parser.add_argument(
        "--quality-check",
        action="store_true",
        help="also evaluate each trained GFocalV2 without its quality factor, and report the "
        "factor's spread (what the DGQP contributes to the ranking)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="analyze the finished runs, train nothing"
    )
    add_register_coco_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run")
    return parser


def run_command(args, dataset, detector_opts, seed, output_dir, weights=None):
    """The train_digits.py command line of one run; with ``weights``, of its evaluation."""
    cmd = [sys.executable, TRAIN_SCRIPT, "--config-file", args.config_file, "--num-vis", "0"]
    if weights:
        cmd += ["--eval-only"]
    if args.data_root:
        cmd += ["--data-root", args.data_root]
    for name, json_file, image_dir in args.register_coco or []:
        cmd += ["--register-coco", name, json_file, image_dir]
    return cmd + [
        *detector_opts,
        "DATASETS.TRAIN",
        f"('{dataset}_train',)",
        "DATASETS.TEST",
        f"('{dataset}_val',)",
        "SEED",
        str(seed),
        *args.opts,
        *(["MODEL.WEIGHTS", weights] if weights else []),
        "OUTPUT_DIR",
        output_dir,
    ]


def _stamp(cmd):
    """What identifies a run: its command without the interpreter, paths inside the repository
    relative to it (a clone elsewhere reuses the runs)."""
    inside = REPO + os.sep
    return [os.path.relpath(x, REPO) if x.startswith(inside) else x for x in cmd[1:]]


def _is_done(output_dir, cmd):
    try:
        with open(os.path.join(output_dir, STAMP)) as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        return False
    return stamp.get("command") == _stamp(cmd) and os.path.isfile(os.path.join(output_dir, RESULTS))


def mark_done(output_dir, cmd):
    """Record that the run ``cmd`` finished in ``output_dir`` (see :func:`_is_done`)."""
    with open(os.path.join(output_dir, STAMP), "w") as f:
        json.dump({"command": _stamp(cmd)}, f, indent=1)


def plan_runs(args):
    """The runs ({dataset, detector, seed, iteration (None: the trained model), out, cmd}) in
    the order they train: seed by seed, so that an interrupted study has complete pairs."""
    runs = []
    for dataset, seed in itertools.product(args.datasets, args.seeds):
        for key, _, opts in DETECTORS:
            out = os.path.abspath(os.path.join(args.output, dataset, key, f"seed{seed}"))
            cmd = run_command(args, dataset, opts, seed, out)
            runs.append(
                dict(dataset=dataset, detector=key, seed=seed, iteration=None, out=out, cmd=cmd)
            )
    return runs


def plan_curve(args, runs):
    """The evaluations of every finished run's intermediate checkpoints (``model_<iter>.pth``,
    saved every SOLVER.CHECKPOINT_PERIOD): runs as :func:`plan_runs`', with ``iteration`` set."""
    opts = {key: o for key, _, o in DETECTORS}
    evals = []
    for run in runs:
        if not _is_done(run["out"], run["cmd"]):
            continue
        for name in sorted(os.listdir(run["out"])):
            m = re.fullmatch(r"model_(\d+)\.pth", name)
            if not m:
                continue
            iteration = int(m.group(1)) + 1
            out = os.path.join(run["out"], f"eval_iter{iteration}")
            weights = os.path.join(run["out"], name)
            cmd = run_command(
                args, run["dataset"], opts[run["detector"]], run["seed"], out, weights
            )
            evals.append({**run, "iteration": iteration, "out": out, "cmd": cmd})
    return evals


def train_all(runs, jobs):
    """Train the runs that are not done, ``jobs`` at a time; returns the failed output dirs."""
    todo = [r for r in runs if not _is_done(r["out"], r["cmd"])]
    print(f"[dgqp-study] {len(runs) - len(todo)} of {len(runs)} runs already done", flush=True)
    threads = str(max(1, (os.cpu_count() or 1) // max(1, jobs)))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    running, failed, started = [], [], time.perf_counter()
    done = 0
    while todo or running:
        while todo and len(running) < jobs:
            run = todo.pop(0)
            out, cmd = run["out"], run["cmd"]
            name = f"{run['dataset']} {run['detector']} seed {run['seed']}"
            if run["iteration"] is not None:
                name += f" (evaluation at iteration {run['iteration']})"
            os.makedirs(out, exist_ok=True)
            log = open(os.path.join(out, "study_stdout.log"), "w")
            log.write(f"$ {shlex.join(cmd)}\n")  # the command, for the curious
            log.flush()
            print(f"[dgqp-study] start {name} (log: {log.name})", flush=True)
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            running.append((proc, log, out, cmd, name))
        time.sleep(2)
        for item in list(running):
            proc, log, out, cmd, name = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            done += 1
            minutes = (time.perf_counter() - started) / 60
            if proc.returncode == 0 and os.path.isfile(os.path.join(out, RESULTS)):
                mark_done(out, cmd)
                print(f"[dgqp-study] done {name} ({done} run, {minutes:.1f} min)", flush=True)
            else:
                failed.append(out)
                print(
                    f"[dgqp-study] FAILED {name} (exit {proc.returncode}): see "
                    f"{os.path.join(out, 'study_stdout.log')}",
                    flush=True,
                )
    return failed


def quality_factor_check(run):
    """What a GFocalV2 run's DGQP contributes at test time, from its trained model: the spread
    of its quality factor q = sigmoid(DGQP output) over the locations whose score passes the
    test threshold (percentiles 5, 50, 95), and its AP with the score = the classification
    alone (q left out), next to its AP. Cached in ``<run>/quality_check.json``."""
    path = os.path.join(run["out"], "quality_check.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    import torch
    from detectron2.data import build_detection_test_loader
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset
    from detectron2.modeling import build_model

    import gfocalv2.modeling  # noqa: F401  (registers GFocalV2)
    from gfocalv2.checkpoint import load_weights
    from gfocalv2.engine import build_cfg

    cfg = build_cfg(
        os.path.join(run["out"], "config.yaml"),
        ["MODEL.WEIGHTS", os.path.join(run["out"], "model_final.pth")],
    )
    model = load_weights(build_model(cfg), cfg).eval()
    joint_scores, qualities = model.joint_scores, []

    # Instance-level overrides of GFocalV2.joint_scores (the one place where the quality factor
    # enters the score): the first records q where the model's own score passes the threshold,
    # the second scores by the classification alone, as GFL (V1) does.
    def recording(cls_logits, quality_logits):
        scores = joint_scores(cls_logits, quality_logits)
        passing = scores.max(dim=-1).values > model.test_score_thresh
        qualities.append(quality_logits.float().sigmoid()[passing].flatten())
        return scores

    def classification_only(cls_logits, quality_logits):
        return joint_scores(cls_logits, None)

    dataset = cfg.DATASETS.TEST[0]
    ap = {}
    for name, override in (("joint", recording), ("classification_only", classification_only)):
        model.joint_scores = override
        evaluator = COCOEvaluator(dataset, output_dir=os.path.join(run["out"], "quality_check"))
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # pycocotools' prints
            results = inference_on_dataset(
                model, build_detection_test_loader(cfg, dataset), evaluator
            )
        ap[name] = float(results["bbox"]["AP"])
    q = torch.cat(qualities).numpy() if qualities else np.zeros(0)
    check = {
        "ap": ap["joint"],
        "ap_classification_only": ap["classification_only"],
        "quality_percentiles_5_50_95": [float(v) for v in np.percentile(q, [5, 50, 95])]
        if len(q)
        else None,
        "num_locations": int(len(q)),
    }
    with open(path, "w") as f:
        json.dump(check, f, indent=1)
    return check


def paired_bootstrap(diffs, num, seed=0):
    """95 % percentile interval of the mean of ``diffs`` (n,) over ``num`` resamples of the
    pairs with replacement."""
    diffs = np.asarray(diffs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(num, len(diffs)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def sign_flip_p_value(diffs):
    """Exact two-sided p-value of the mean paired difference: the share of the 2^n sign
    assignments whose |mean| is at least the observed one (no difference = each pair's sign
    is a coin flip)."""
    diffs = np.asarray(diffs, dtype=np.float64)
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(diffs))))
    flipped = np.abs((signs * diffs).mean(axis=1))
    return float(np.mean(flipped >= abs(diffs.mean()) - 1e-12))


def measure_run(gt, results_path):
    """{metric: value} of one run's predictions (AP and AP75 in points, correlations)."""
    with open(results_path) as f:
        if not json.load(f):  # no detection at all (an untrained model): AP 0, no correlation
            nan = float("nan")
            return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0, "pearson": nan, "spearman": nan}
    r = analyze_results(gt, load_results(results_path, gt))
    return {
        "ap": float(r["coco"]["ap"]),
        "ap50": float(r["coco"]["ap50"]),
        "ap75": float(r["coco"]["ap75"]),
        "pearson": float(r["quality"]["pearson"]),
        "spearman": float(r["quality"]["spearman"]),
    }


def summarize(per_run, seeds, num_bootstrap):
    """The statistics of one dataset from ``per_run[detector][seed] = {metric: value}``
    (only seeds with both detectors count)."""
    (a, _, _), (b, _, _) = DETECTORS
    paired = [s for s in seeds if s in per_run.get(a, {}) and s in per_run.get(b, {})]
    out = {"seeds": paired, "metrics": {}}
    for m in METRICS:
        va = np.array([per_run[a][s][m] for s in paired])
        vb = np.array([per_run[b][s][m] for s in paired])
        finite = np.isfinite(va) & np.isfinite(vb)  # a correlation needs detections
        va, vb = va[finite], vb[finite]
        d = va - vb
        entry = {
            a: {
                "mean": float(va.mean()) if len(va) else None,
                "std": float(va.std(ddof=1)) if len(va) > 1 else None,
            },
            b: {
                "mean": float(vb.mean()) if len(vb) else None,
                "std": float(vb.std(ddof=1)) if len(vb) > 1 else None,
            },
            "difference": float(d.mean()) if len(d) else None,
            "leads": int((d > 0).sum()),
            "pairs": int(len(d)),
        }
        if len(d) >= 2:
            entry["bootstrap_95"] = paired_bootstrap(d, num_bootstrap)
            entry["sign_flip_p"] = sign_flip_p_value(d)
        out["metrics"][m] = entry
    return out


def _fmt(v, spec=".2f"):
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def format_report(report):
    (a, label_a, _), (b, label_b, _) = DETECTORS
    lines = [f"# DGQP study: {label_a} - {label_b}", "", f"Runs: `{report['command']}`", ""]
    for dataset, d in report["datasets"].items():
        lines += [f"## {dataset}", "", f"| seed | detector | {' | '.join(METRICS)} |"]
        lines.append("|---" * (len(METRICS) + 2) + "|")
        for seed in d["seeds"]:
            for key, label, _ in DETECTORS:
                run = d["runs"][key][str(seed)]
                lines.append(
                    f"| {seed} | {label} | "
                    + " | ".join(
                        _fmt(run[m], ".1f" if m.startswith("ap") else ".4f") for m in METRICS
                    )
                    + " |"
                )
        s = d["summary"]
        lines += [
            "",
            f"| metric | {label_a} mean (sd) | {label_b} mean (sd) | difference | "
            f"95 % paired bootstrap | {label_a} ahead | sign-flip p |",
            "|---|---|---|---|---|---|---|",
        ]
        for m, e in s["metrics"].items():
            spec = ".2f" if m.startswith("ap") else ".4f"
            ci = e.get("bootstrap_95")
            lines.append(
                f"| {m} | {_fmt(e[a]['mean'], spec)} ({_fmt(e[a]['std'], spec)}) | "
                f"{_fmt(e[b]['mean'], spec)} ({_fmt(e[b]['std'], spec)}) | "
                f"{_fmt(e['difference'], '+' + spec)} | "
                + (f"[{ci[0]:+{spec}}, {ci[1]:+{spec}}]" if ci else "n/a")
                + f" | {e['leads']} of {e['pairs']} | {_fmt(e.get('sign_flip_p'), '.3f')} |"
            )
        lines.append("")
        if d.get("quality_check"):
            lines += [
                f"{label_a}'s quality factor q (the DGQP's output) at test time: its spread over "
                "the locations that pass the score threshold, and the AP without it (score = "
                "classification alone)",
                "",
                "| seed | AP | AP without q | q: 5th, 50th, 95th percentile |",
                "|---|---|---|---|",
            ]
            for seed, c in d["quality_check"].items():
                q = c["quality_percentiles_5_50_95"]
                spread = ", ".join(f"{v:.4f}" for v in q) if q else "n/a"
                lines.append(
                    f"| {seed} | {c['ap']:.2f} | {c['ap_classification_only']:.2f} | {spread} |"
                )
            lines.append("")
        if d.get("curve"):
            lines += [
                f"During training (the intermediate checkpoints; the last row is the trained "
                f"model): mean over the paired seeds, {label_a} - {label_b}",
                "",
                "| iteration | AP difference | 95 % paired bootstrap | ahead | "
                "pearson difference |",
                "|---|---|---|---|---|",
            ]
            for it, c in [*d["curve"].items(), ("final", s)]:
                ap, pe = c["metrics"]["ap"], c["metrics"]["pearson"]
                ci = ap.get("bootstrap_95")
                lines.append(
                    f"| {it} | {_fmt(ap['difference'], '+.2f')} | "
                    + (f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "n/a")
                    + f" | {ap['leads']} of {ap['pairs']} | {_fmt(pe['difference'], '+.4f')} |"
                )
            lines.append("")
    return "\n".join(lines)


def build_report(args, runs):
    """Measure every finished run and summarize each dataset; returns the report dict."""
    report = {
        "command": shlex.join(["python", "tools/dgqp_study.py", *sys.argv[1:]]),
        "datasets": {},
    }
    for dataset in args.datasets:
        gt = load_ground_truth(f"{dataset}_val", os.path.join(args.output, dataset))
        by_iteration = {}  # iteration (None: final) -> detector -> seed -> metrics
        for run in runs:
            if run["dataset"] == dataset and _is_done(run["out"], run["cmd"]):
                metrics = measure_run(gt, os.path.join(run["out"], RESULTS))
                by_iteration.setdefault(run["iteration"], {}).setdefault(run["detector"], {})[
                    run["seed"]
                ] = metrics
        per_run = by_iteration.pop(None, {})
        summary = summarize(per_run, args.seeds, args.bootstrap)
        checks = {}
        if args.quality_check:
            for run in runs:
                final = run["iteration"] is None and run["detector"] == DETECTORS[0][0]
                if run["dataset"] == dataset and final and _is_done(run["out"], run["cmd"]):
                    checks[str(run["seed"])] = quality_factor_check(run)
        report["datasets"][dataset] = {
            "quality_check": checks,
            "runs": {k: {str(s): v for s, v in r.items()} for k, r in per_run.items()},
            "summary": summary,
            "seeds": summary["seeds"],
            "curve": {
                str(it): summarize(by_iteration[it], args.seeds, args.bootstrap)
                for it in sorted(by_iteration)
            },
        }
    return report


def parse_args(argv):
    """The options, then the overrides: everything from the first config key (``SOLVER.X``) on,
    so that ``--seeds 0 1 SOLVER.MAX_ITER 10`` does not read the overrides as seeds."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((i for i, a in enumerate(argv) if CONFIG_KEY.match(a)), len(argv))
    args = get_parser().parse_args(argv[:first])
    args.opts = list(args.opts) + argv[first:]
    return args


def main(argv=None):
    args = parse_args(argv)
    if len(args.opts) % 2:
        sys.exit(f"error: overrides come in KEY VALUE pairs, got {args.opts}")
    if any(k == "OUTPUT_DIR" for k in args.opts[::2]):
        sys.exit("error: set the study's folder with --output, not OUTPUT_DIR")
    logging.basicConfig(level=logging.WARNING)
    from digit_scenes import register_variants

    # Data first, once: the runs then find it cached (two runs must not both generate it).
    names = [f"{d}_{split}" for d in args.datasets for split in ("train", "val")]
    register_variants(names, args.data_root)
    register_coco_datasets(args.register_coco or [], source="--register-coco")
    from detectron2.data import DatasetCatalog

    missing = [n for n in names if n not in DatasetCatalog.list()]
    if missing:
        sys.exit(
            f"error: dataset(s) {', '.join(missing)} are not registered: use a DigitScenes "
            "variant (digit_scenes, digit_scenes_crowded) or --register-coco NAME JSON IMAGE_DIR"
        )
    runs = plan_runs(args)
    failed = [] if args.report_only else train_all(runs, args.jobs)
    if args.curve:
        evals = plan_curve(args, runs)
        failed += [] if args.report_only else train_all(evals, args.jobs)
        runs = runs + evals
    report = build_report(args, runs)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "report.json"), "w") as f:
        json.dump(_jsonable(report), f, indent=1)  # NaN as null
    text = format_report(report)
    with open(os.path.join(args.output, "report.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"[dgqp-study] written: {os.path.join(args.output, 'report.md')}, report.json")
    if failed:
        print(f"[dgqp-study] {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
