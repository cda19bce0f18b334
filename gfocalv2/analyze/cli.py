"""``python -m gfocalv2.analyze``: the argument parser, running the models, the analysis of each
results file, the table and the files written (see :mod:`gfocalv2.analyze`)."""

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys

import numpy as np

from ..checkpoint import CheckpointError
from ..config_checks import ConfigError
from ..engine.arguments import add_register_coco_argument
from .coco import AnalysisInputError, coco_evaluation, load_ground_truth, load_results
from .errors import tide_errors
from .plots import write_plots
from .quality import best_gt_iou, quality_correlation, reliability_bins

__all__ = ["get_parser", "main", "analyze", "analyze_results", "run_model"]

logger = logging.getLogger(__name__)

RESULTS_JSON = "coco_instances_results.json"


class _NewModel(argparse.Action):
    """``--config-file FILE``: a model to run, configured by the ``--opts`` that follow it."""

    def __call__(self, parser, namespace, value, option_string=None):
        models = list(getattr(namespace, self.dest) or [])
        setattr(namespace, self.dest, models + [{"config_file": value, "opts": []}])


class _ModelOpts(argparse.Action):
    """``--opts KEY VALUE ...``: config overrides of the last ``--config-file``."""

    def __call__(self, parser, namespace, values, option_string=None):
        models = getattr(namespace, self.dest) or []
        if not models:
            parser.error("--opts configures a model: put it after that model's --config-file")
        models[-1]["opts"].extend(values)


def get_parser():
    """The tool's flags. ``--config-file`` and ``--opts`` are repeatable (one model each), which
    the single-model helpers of :mod:`gfocalv2.engine.arguments` are not; they read the same."""
    doc = sys.modules[__package__].__doc__
    p = argparse.ArgumentParser(
        prog="python -m gfocalv2.analyze",
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--dataset",
        default="",
        metavar="NAME",
        help="the registered dataset the results were computed on (default: DATASETS.TEST[0] "
        "of the first --config-file)",
    )
    add_register_coco_argument(p)
    p.add_argument(
        "--results",
        nargs="+",
        default=[],
        metavar="JSON",
        help="coco_instances_results.json files written by evaluation (OUTPUT_DIR/inference/)",
    )
    p.add_argument(
        "--labels",
        nargs="+",
        default=[],
        metavar="LABEL",
        help="one name per --results file, then one per --config-file, in that order "
        "(default: the folder above inference/, or the file name)",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="where to write everything")
    p.add_argument(
        "--config-file",
        dest="models",
        action=_NewModel,
        default=[],
        metavar="FILE",
        help="a model to evaluate on --dataset first (repeatable; its --opts follow it)",
    )
    p.add_argument(
        "--opts",
        dest="models",
        action=_ModelOpts,
        nargs="+",
        metavar="KEY VALUE",
        help="config overrides of the --config-file before, e.g. --opts MODEL.WEIGHTS model.pth",
    )
    return p


@contextlib.contextmanager
def _input_errors():
    """The errors a user's input causes (registration, config, weights, dataset checks; each
    names what is wrong) as :class:`AnalysisInputError`; the analysis itself is not wrapped."""
    try:
        yield
    except AnalysisInputError:
        raise
    except (ConfigError, CheckpointError, FileNotFoundError, KeyError, ValueError) as e:
        raise AnalysisInputError(e.args[0] if e.args else str(e)) from e


def _default_label(path):
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    if len(parts) >= 3 and parts[-2] == "inference":
        return parts[-3]
    return os.path.splitext(parts[-1])[0]


def _labels(labels, results, models):
    """One label per results file, then per model; errors name the mismatch."""
    num = len(results) + len(models)
    if not num:
        raise AnalysisInputError(
            "Nothing to analyze: pass --results FILE [FILE ...] and/or --config-file FILE "
            "--opts MODEL.WEIGHTS W"
        )
    if not labels:
        labels = [_default_label(r) for r in results]
        labels += [os.path.splitext(os.path.basename(m["config_file"]))[0] for m in models]
    elif len(labels) != num:
        raise AnalysisInputError(
            f"--labels gives {len(labels)} names ({', '.join(labels)}) for {num} models "
            f"({len(results)} --results files, {len(models)} --config-file models): give one "
            "label per results file, then one per --config-file, in that order"
        )
    if len(set(labels)) != len(labels):
        raise AnalysisInputError(
            f"The labels {labels} repeat a name; give each model its own with --labels"
        )
    return list(labels)


def run_model(config_file, opts, register_coco, dataset, output_dir):
    """Evaluate the model of ``config_file`` + ``opts`` on ``dataset`` (default
    ``DATASETS.TEST[0]``) as ``Trainer.test`` does, with ``OUTPUT_DIR`` ``output_dir``; returns
    the results json written by Detectron2's ``COCOEvaluator`` and the dataset name."""
    from detectron2.modeling import build_model

    from ..checkpoint import load_weights
    from ..engine import Trainer, build_cfg

    cfg = build_cfg(config_file, opts, register_coco, freeze=False)
    if not cfg.MODEL.WEIGHTS:
        raise AnalysisInputError(
            f"--config-file {config_file}: MODEL.WEIGHTS is empty, so the model would be "
            "random; pass the trained weights after it: --opts MODEL.WEIGHTS model_final.pth"
        )
    if not dataset:
        if not cfg.DATASETS.TEST:
            raise AnalysisInputError(
                f"--config-file {config_file} has no DATASETS.TEST: pass --dataset NAME"
            )
        dataset = cfg.DATASETS.TEST[0]
    elif cfg.DATASETS.TEST and cfg.DATASETS.TEST[0] != dataset:
        logger.info("%s: evaluating on --dataset %s, not DATASETS.TEST[0]", config_file, dataset)
    cfg.DATASETS.TRAIN = ()  # only the test set is read
    cfg.DATASETS.TEST = (dataset,)
    cfg.OUTPUT_DIR = output_dir
    cfg.freeze()
    model = build_model(cfg)
    load_weights(model, cfg)  # missing/unreadable file, other architecture or classes: named
    if cfg.TEST.AUG.ENABLED:  # the detections of test-time augmentation (TEST.AUG)
        Trainer.test_with_TTA(cfg, model)
        path = os.path.join(output_dir, "inference_TTA", RESULTS_JSON)
    else:
        Trainer.test(cfg, model)
        path = os.path.join(output_dir, "inference", RESULTS_JSON)
    if not os.path.isfile(path):
        raise AnalysisInputError(
            f"--config-file {config_file} with MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}: evaluation on "
            f"{dataset} wrote no {path} (did the model predict nothing?)"
        )
    return path, dataset


def analyze_results(gt, dets):
    """Everything the analysis reports for one :class:`~.coco.Detections` on its
    :class:`~.coco.GroundTruth`: ``score``, ``iou`` (N,), ``quality``, ``reliability``,
    ``coco`` (:func:`~.coco.coco_evaluation`), ``errors`` (:func:`~.errors.tide_errors`)."""
    iou, _ = best_gt_iou(
        dets.image_id, dets.category_id, dets.box, gt.image_id, gt.category_id, gt.box, gt.crowd
    )
    return {
        "score": dets.score,
        "iou": iou,
        "quality": quality_correlation(dets.score, iou),
        "reliability": reliability_bins(dets.score, iou),
        "coco": coco_evaluation(gt, dets),
        "errors": tide_errors(gt, dets),
    }


def _jsonable(x):
    """NumPy values as Python ones; NaN as None (null in JSON)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer, int)) and not isinstance(x, bool):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(x) else float(x)
    return x


def _summary(r):
    q, e = r["quality"], r["coco"]
    return {
        "pearson": q["pearson"],
        "spearman": q["spearman"],
        "num_detections": q["num_detections"],
        "ap": e["ap"],
        "ap50": e["ap50"],
        "ap75": e["ap75"],
    }


def format_table(summary):
    """The summary as a fixed-width table (NaN shown as n/a)."""

    def f(v, spec):
        return "n/a" if v is None or math.isnan(v) else format(v, spec)

    width = max([5] + [len(k) for k in summary])
    lines = [
        f"{'model':<{width}}  pearson  spearman  detections(IoU>=0.5)     AP   AP50   AP75",
    ]
    for label, s in summary.items():
        lines.append(
            f"{label:<{width}}  {f(s['pearson'], '7.4f'):>7}  {f(s['spearman'], '8.4f'):>8}  "
            f"{s['num_detections']:>20d}  {f(s['ap'], '5.1f'):>5}  {f(s['ap50'], '5.1f'):>5}  "
            f"{f(s['ap75'], '5.1f'):>5}"
        )
    return "\n".join(lines)


def analyze(dataset, results, labels, output, models=(), register_coco=()):
    """The whole analysis (see :mod:`gfocalv2.analyze`); returns the summary written to
    ``summary.json`` (None for a coefficient that cannot be computed). A bad input is an
    :class:`AnalysisInputError` that names it.

    Args:
        dataset: registered dataset name ("" with ``models``: the first one's DATASETS.TEST[0]).
        results: results json paths; ``models``: ``[{"config_file", "opts"}]`` to run first.
        labels: one per results file then per model ([]: defaults).
        output: the output folder; ``register_coco``: ``(NAME, JSON, IMAGE_DIR)`` triples.
    """
    from ..data.datasets import register_coco_datasets

    models = list(models)
    labels = _labels(labels, list(results), models)
    if not dataset and not models:
        raise AnalysisInputError("Pass --dataset NAME: the dataset the results were computed on")
    os.makedirs(output, exist_ok=True)
    runs = list(zip(labels, results))
    with _input_errors():
        register_coco_datasets(register_coco, source="--register-coco")
        for label, m in zip(labels[len(results) :], models):
            folder = os.path.join(output, re.sub(r"[^\w.-]+", "_", label))
            path, dataset = run_model(m["config_file"], m["opts"], register_coco, dataset, folder)
            runs.append((label, path))
        gt = load_ground_truth(dataset, output)
    detections = [(label, load_results(path, gt)) for label, path in runs]  # all checked first
    analyzed = [(label, analyze_results(gt, dets)) for label, dets in detections]

    summary = _jsonable({label: _summary(r) for label, r in analyzed})  # NaN -> None
    details = {
        label: {
            "results_file": os.path.abspath(dets.path),
            "num_detections_total": len(dets),
            "ap_per_class": dict(zip(gt.class_names, r["coco"]["ap_per_class"])),
            "reliability": r["reliability"],
            "errors": r["errors"],
        }
        for (label, dets), (_, r) in zip(detections, analyzed)
    }
    with open(os.path.join(output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(output, "details.json"), "w") as f:
        json.dump({"dataset": dataset, "models": _jsonable(details)}, f, indent=1)
    plots = write_plots(analyzed, output, gt.class_names)
    print(f"Quality-IoU correlation on {dataset} ({gt.json_file}):")
    print(format_table(summary))
    print(
        f"Written to {output}: summary.json, details.json, "
        + ", ".join(os.path.basename(p) for p in plots.values())
    )
    return summary


def main(argv=None):
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the summary. A bad input
    ends the program with its message and exit status 2 (no traceback)."""
    parser = get_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        return analyze(
            args.dataset, args.results, args.labels, args.output, args.models, args.register_coco
        )
    except AnalysisInputError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
