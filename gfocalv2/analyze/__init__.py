"""Does the score estimate localization quality? GFL (V1) and GFocalV2 side by side.

    python -m gfocalv2.analyze --dataset NAME [--register-coco NAME JSON IMAGE_DIR] \\
        --results A.json [B.json ...] --labels GFLV2 GFLV1 --output DIR
    python -m gfocalv2.analyze --dataset NAME --labels GFLV2 GFLV1 --output DIR \\
        --config-file A.yaml --opts MODEL.WEIGHTS a.pth \\
        --config-file B.yaml --opts MODEL.WEIGHTS b.pth

Each results file is the ``coco_instances_results.json`` that evaluation writes
(``OUTPUT_DIR/inference/``). A ``--config-file`` (with its own ``--opts``, until the next
``--config-file``) is a model to run first: it is evaluated on ``--dataset`` (default: its
``DATASETS.TEST[0]``), writing its results under ``DIR/<label>/inference/``. ``--labels`` names
the results files, then the models, in that order.

For each results file:

* the quality-IoU correlation of GFocalV2's paper: every detection's IoU with the
  best-overlapping ground-truth box of its class in its image (crowd boxes excluded); over the
  detections whose IoU is >= 0.5, the Pearson and Spearman coefficients between their scores and
  those IoUs, and their count (:mod:`.quality`);
* AP, AP50, AP75 (0-100), AP per class and the precision-recall curves at IoU 0.5 and 0.75, from
  pycocotools' ``COCOeval`` as Detectron2's ``COCOEvaluator`` runs it (:mod:`.coco`);
* the AP50 lost to each of TIDE's six error types (:mod:`.errors`).

Written to ``DIR``: ``summary.json`` (``{label: {"pearson", "spearman", "num_detections", "ap",
"ap50", "ap75"}}``), ``details.json`` (per-class AP, reliability bins, error dAP and counts), and
the plots, models side by side (:mod:`.plots`): ``score_vs_iou.png``, ``reliability.png``,
``pr_curves.png``, ``ap_per_class.png``, ``errors.png``. See ``docs/analysis.md``.
"""

from .. import compat

# an entry point (python -m gfocalv2.analyze):
# the fixes come before anything imports Detectron2
compat.apply()

from .cli import analyze, get_parser, main
from .coco import AnalysisInputError, coco_evaluation, load_ground_truth, load_results
from .errors import ERROR_TYPES, tide_errors
from .quality import best_gt_iou, pearson, quality_correlation, reliability_bins, spearman

__all__ = [
    "main",
    "get_parser",
    "analyze",
    "AnalysisInputError",
    "load_ground_truth",
    "load_results",
    "coco_evaluation",
    "best_gt_iou",
    "quality_correlation",
    "pearson",
    "spearman",
    "reliability_bins",
    "tide_errors",
    "ERROR_TYPES",
]
