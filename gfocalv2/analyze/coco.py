"""The dataset and the results files: loading them, checking that they belong together, and the
COCO evaluation of a results file (pycocotools' ``COCOeval``, as Detectron2's ``COCOEvaluator``
runs it): AP / AP50 / AP75 on the 0-100 scale, AP per class and the precision-recall curves."""

import contextlib
import io
import json
import logging
import os

import numpy as np

__all__ = [
    "AnalysisInputError",
    "GroundTruth",
    "Detections",
    "load_ground_truth",
    "load_results",
    "coco_evaluation",
]

logger = logging.getLogger(__name__)


class AnalysisInputError(ValueError):
    """An input of the analysis is unusable; the message names it and what to do."""


class GroundTruth:
    """A dataset's ground truth: the pycocotools ``COCO`` object ``coco`` and flat arrays.

    Attributes:
        name: the dataset name; ``json_file``: its COCO json.
        image_id, category_id: (M,) int64; ``box``: (M, 4) float64 XYWH; ``crowd``: (M,) bool.
        image_ids: (I,) every image id of the dataset (also those without boxes).
        category_ids: (K,) sorted category ids; ``class_names``: their K names.
    """

    def __init__(self, name, json_file, coco):
        self.name, self.json_file, self.coco = name, json_file, coco
        anns = coco.dataset.get("annotations", [])
        self.image_id = np.array([a["image_id"] for a in anns], dtype=np.int64)
        self.category_id = np.array([a["category_id"] for a in anns], dtype=np.int64)
        self.box = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        self.crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
        self.image_ids = np.array(sorted(coco.getImgIds()), dtype=np.int64)
        self.category_ids = np.array(sorted(coco.getCatIds()), dtype=np.int64)
        cats = coco.loadCats(self.category_ids.tolist())
        self.class_names = [str(c.get("name", c["id"])) for c in cats]


class Detections:
    """One results file, checked against the dataset: (N,) arrays ``image_id``, ``category_id``
    (int64), ``score`` (float64), ``box`` (N, 4) XYWH; ``records``: the json's list of dicts."""

    def __init__(self, path, records):
        self.path, self.records = path, records
        self.image_id = np.array([r["image_id"] for r in records], dtype=np.int64)
        self.category_id = np.array([r["category_id"] for r in records], dtype=np.int64)
        self.score = np.array([r["score"] for r in records], dtype=np.float64)
        self.box = np.array([r["bbox"] for r in records], dtype=np.float64).reshape(-1, 4)

    def __len__(self):
        return len(self.records)


def load_ground_truth(dataset_name, cache_dir):
    """The registered dataset ``dataset_name`` as :class:`GroundTruth`: its COCO json
    (``MetadataCatalog``'s ``json_file``), or, for a dataset registered without one, its dicts
    converted as ``COCOEvaluator`` does (cached as ``cache_dir/<name>_coco_format.json``)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets.coco import convert_to_coco_json
    from pycocotools.coco import COCO

    if dataset_name not in DatasetCatalog.list():
        raise AnalysisInputError(
            f"--dataset {dataset_name!r} is not registered. Register the COCO json the results "
            "were evaluated on with --register-coco NAME JSON IMAGE_DIR (and --dataset NAME), "
            "or use a Detectron2 builtin dataset."
        )
    meta = MetadataCatalog.get(dataset_name)
    json_file = getattr(meta, "json_file", None)
    if not json_file:
        json_file = os.path.join(cache_dir, f"{dataset_name}_coco_format.json")
        logger.info("Converting %r to COCO format: %s", dataset_name, json_file)
        convert_to_coco_json(dataset_name, json_file)
    if not os.path.isfile(json_file):
        raise AnalysisInputError(
            f"The annotations of dataset {dataset_name!r} ({json_file}) do not exist"
        )
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while loading
        coco = COCO(json_file)
    if not coco.dataset.get("annotations"):
        raise AnalysisInputError(
            f"Dataset {dataset_name!r} ({json_file}) has no annotations: the analysis compares "
            "detections with ground-truth boxes"
        )
    return GroundTruth(dataset_name, json_file, coco)


_KEYS = ("image_id", "category_id", "bbox", "score")


def _read_records(path):
    if not os.path.isfile(path):
        raise AnalysisInputError(f"Results file {path} does not exist")
    try:
        with open(path) as f:
            records = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise AnalysisInputError(
            f"Results file {path} is not JSON ({e}). Pass the coco_instances_results.json that "
            "evaluation writes (OUTPUT_DIR/inference/)."
        ) from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise AnalysisInputError(
            f"Results file {path} is not a list of detections: expected COCO's results format, "
            '[{"image_id": ..., "category_id": ..., "bbox": [x, y, w, h], "score": ...}, ...], '
            "as in the coco_instances_results.json that evaluation writes"
        )
    if not records:
        raise AnalysisInputError(
            f"Results file {path} holds no detections (the model predicted nothing on the "
            "dataset), so there is nothing to analyze. Check the checkpoint it was evaluated with."
        )
    for i, r in enumerate(records):
        missing = [k for k in _KEYS if k not in r]
        box = r.get("bbox")
        if missing or not (isinstance(box, (list, tuple)) and len(box) == 4):
            what = f"lacks {', '.join(missing)}" if missing else f"has bbox {box!r}"
            raise AnalysisInputError(
                f"Results file {path}: detection {i} {what}; each detection needs image_id, "
                "category_id, bbox [x, y, w, h] and score (box results, not masks or keypoints)"
            )
    return records


def _unknown(values, known):
    unknown = np.setdiff1d(np.unique(values), known)
    return unknown, np.isin(values, unknown).sum()


def load_results(path, gt):
    """The results file ``path`` as :class:`Detections`, checked against :class:`GroundTruth`
    ``gt``: JSON, a non-empty list of box detections, every image id and category id in the
    dataset. Every failure is an :class:`AnalysisInputError` naming the file and the fix."""
    dets = Detections(path, _read_records(path))
    bad_images, n = _unknown(dets.image_id, gt.image_ids)
    if len(bad_images):
        raise AnalysisInputError(
            f"Results file {path}: {n} of {len(dets)} detections are on image ids that dataset "
            f"{gt.name!r} ({gt.json_file}) does not have (e.g. {bad_images[:5].tolist()}). "
            "Were these results computed on another dataset? Pass that dataset with --dataset "
            "(--register-coco NAME JSON IMAGE_DIR registers its json)."
        )
    bad_cats, n = _unknown(dets.category_id, gt.category_ids)
    if len(bad_cats):
        raise AnalysisInputError(
            f"Results file {path}: {n} of {len(dets)} detections have category ids "
            f"{bad_cats[:10].tolist()}, which dataset {gt.name!r} does not have (its categories: "
            f"{gt.category_ids.tolist()}). Were these results computed on another dataset, "
            "or with another class mapping? Pass the dataset they were evaluated on with --dataset."
        )
    if not np.isfinite(dets.score).all() or not np.isfinite(dets.box).all():
        raise AnalysisInputError(f"Results file {path}: some scores or boxes are NaN or inf")
    return dets


def _mean_valid(values, axis, empty):
    """Mean of the entries > -1 of ``values`` along ``axis``; ``empty`` where there are none."""
    valid = values > -1
    total, count = np.where(valid, values, 0).sum(axis=axis), valid.sum(axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), empty)


def coco_evaluation(gt, dets):
    """pycocotools' ``COCOeval`` of ``dets`` on ``gt``, bbox, as Detectron2's ``COCOEvaluator``.

    Returns:
        ``{"ap", "ap50", "ap75"}`` (floats, 0-100; NaN where COCOeval has none),
        ``"ap_per_class"``: (K,) float64 0-100 in ``gt.class_names`` order (NaN: no ground truth),
        ``"recall"``: (R,) COCOeval's 101 recall thresholds, ``"precision"``: ``{0.5: (R,),
        0.75: (R,)}`` precision averaged over the classes that have ground truth (all areas,
        100 detections per image).
    """
    from pycocotools.cocoeval import COCOeval

    records = [dict(r) for r in dets.records]  # loadRes adds keys to the dicts it gets
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = gt.coco.loadRes(records)
        ev = COCOeval(gt.coco, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = ev.stats

    def percent(v):
        return float(v * 100) if v >= 0 else float("nan")

    precision = ev.eval["precision"][:, :, :, 0, -1]  # (T, R, K): all areas, 100 dets/image
    iou_index = {t: int(np.argmin(np.abs(ev.params.iouThrs - t))) for t in (0.5, 0.75)}
    # COCOeval's -1: a class without ground truth. Per class: the mean over IoUs and recalls, as
    # Detectron2 computes it; per curve: the mean over the classes, 0 when none has any.
    per_class = _mean_valid(precision.reshape(-1, precision.shape[2]), axis=0, empty=np.nan)
    curves = {t: _mean_valid(precision[i], axis=1, empty=0.0) for t, i in iou_index.items()}
    return {
        "ap": percent(stats[0]),
        "ap50": percent(stats[1]),
        "ap75": percent(stats[2]),
        "ap_per_class": per_class * 100,
        "recall": np.asarray(ev.params.recThrs, dtype=np.float64),
        "precision": curves,
    }
