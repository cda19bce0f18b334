"""COCO evaluation without Detectron2's compiled ops: faster-coco-eval, through Detectron2's own
``COCOEvaluator``, gives pycocotools' numbers (the 12 stats and the per-class AP).

The synthetic set (seeded): 50 images, 5 categories with non-contiguous ids, about 300 ground-truth
boxes from 4 to 300 pixels (small, medium and large; some crowd), about 3500 detections (jittered
copies of the ground truth, some with the wrong class, and random boxes), more than 100 in one
category of a few images (COCO's maxDets cut). Coordinates are multiples of 1/8 and scores
distinct, so the float32 boxes of ``Instances`` and the reference's float64 ones are the same
numbers.
"""

import contextlib
import io
import json
import logging
import sys

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator, coco_evaluation, fast_eval_api
from detectron2.structures import Boxes, Instances

from gfocalv2 import compat

CATEGORY_IDS = (1, 3, 4, 7, 9)
WIDTH, HEIGHT = 640, 480
FASTER_ROUTE = "COCOeval_opt -> faster-coco-eval COCOeval_faster"
PYCOCOTOOLS_ROUTE = "COCOeval_opt -> pycocotools COCOeval"


def _eighths(x):
    return np.round(np.asarray(x, dtype=np.float64) * 8) / 8


def make_synthetic_set(num_images=50, seed=0):
    """(COCO json dict, detections): {image_id: (xyxy (N, 4), scores (N,), category ids (N,))}."""
    rng = np.random.default_rng(seed)
    images, annotations, detections = [], [], {}
    for i in range(num_images):
        image_id = 1000 + 7 * i  # ids are not positions
        image = {"id": image_id, "file_name": f"{image_id}.jpg", "width": WIDTH, "height": HEIGHT}
        images.append(image)
        gts = []
        for _ in range(rng.integers(2, 11)):
            side = np.exp(rng.uniform(np.log(4), np.log(300)))  # small, medium and large
            w, h = _eighths(side * rng.uniform(0.6, 1.6, 2))
            x, y = _eighths([rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)])
            category = int(rng.choice(CATEGORY_IDS))
            crowd = int(rng.random() < 0.06)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": crowd,
                }
            )
            gts.append((x, y, w, h, category))
        boxes, classes = [], []
        for _ in range(rng.poisson(60)):
            if rng.random() < 0.6:  # a jittered ground truth, sometimes of the wrong class
                x, y, w, h, category = gts[rng.integers(len(gts))]
                x, y = x + rng.normal(0, 0.12 * w), y + rng.normal(0, 0.12 * h)
                w, h = w * np.exp(rng.normal(0, 0.2)), h * np.exp(rng.normal(0, 0.2))
                if rng.random() < 0.15:
                    category = int(rng.choice(CATEGORY_IDS))
            else:
                side = np.exp(rng.uniform(np.log(4), np.log(300)))
                w, h = side * rng.uniform(0.6, 1.6, 2)
                x, y = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
                category = int(rng.choice(CATEGORY_IDS))
            boxes.append([x, y, x + max(w, 1), y + max(h, 1)])
            classes.append(category)
        if i % 17 == 0:  # over 100 detections of one category: maxDets=100 cuts them
            x, y, w, h, category = gts[0]
            jitter = rng.normal(0, 0.1, (120, 4)) * [w, h, w, h]
            boxes += list(np.array([x, y, x + w, y + h]) + jitter)
            classes += [category] * 120
        boxes = _eighths(np.clip(boxes, 0, [WIDTH, HEIGHT, WIDTH, HEIGHT]))
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
        detections[image_id] = [boxes, classes]
    num_detections = sum(len(c) for _, c in detections.values())
    scores = (rng.permutation(num_detections) + 1) / (num_detections + 1)  # distinct
    start = 0
    for image_id, (boxes, classes) in detections.items():
        end = start + len(classes)
        # float32 first: the scores Detectron2's Instances hold
        detections[image_id] = (boxes, scores[start:end].astype(np.float32), np.array(classes))
        start = end
    categories = [{"id": c, "name": f"class_{c}"} for c in CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def reference_cocoeval(json_file, detections):
    """pycocotools' COCOeval on the same detections, computed without Detectron2."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = []
    for image_id, (xyxy, scores, categories) in detections.items():
        for (x0, y0, x1, y1), score, category in zip(xyxy, scores, categories):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(category),
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "score": float(score),
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(json_file)
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    data, detections = make_synthetic_set()
    json_file = str(tmp_path_factory.mktemp("coco_eval") / "synthetic.json")
    with open(json_file, "w") as f:
        json.dump(data, f)
    name = "test_coco_evaluation_synthetic"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, json_file, str(tmp_path_factory.mktemp("images")))
    DatasetCatalog.get(name)  # loads the categories into the metadata, as a data loader does
    return name, json_file, data, detections


def test_synthetic_set_covers_what_coco_evaluation_distinguishes(synthetic):
    _, _, data, detections = synthetic
    areas = np.array([a["area"] for a in data["annotations"]])
    assert 250 <= len(areas) <= 400
    assert (areas < 32**2).sum() > 30 and ((areas >= 32**2) & (areas < 96**2)).sum() > 30
    assert (areas >= 96**2).sum() > 30
    assert sum(a["iscrowd"] for a in data["annotations"]) >= 5
    assert 2500 <= sum(len(s) for _, s, _ in detections.values()) <= 5000


def test_detectron2_coco_evaluator_gives_pycocotools_numbers(synthetic, monkeypatch):
    name, json_file, _, detections = synthetic
    used = []
    evaluate_on_coco = coco_evaluation._evaluate_predictions_on_coco

    def recording(*args, **kwargs):
        used.append(evaluate_on_coco(*args, **kwargs))
        return used[-1]

    monkeypatch.setattr(coco_evaluation, "_evaluate_predictions_on_coco", recording)
    to_contiguous = MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id
    evaluator = COCOEvaluator(name, tasks=("bbox",), distributed=False)  # use_fast_impl=True
    evaluator.reset()
    for image_id, (xyxy, scores, categories) in detections.items():
        instances = Instances((HEIGHT, WIDTH))
        instances.pred_boxes = Boxes(torch.tensor(xyxy, dtype=torch.float32))
        instances.scores = torch.from_numpy(scores)
        instances.pred_classes = torch.tensor([to_contiguous[int(c)] for c in categories])
        evaluator.process([{"image_id": image_id}], [{"instances": instances}])
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval's summary table
        results = evaluator.evaluate()["bbox"]

    assert len(used) == 1
    ours = used[0]
    if not compat.has_compiled_ops():
        from faster_coco_eval import COCOeval_faster

        assert isinstance(ours, COCOeval_faster)
    ref = reference_cocoeval(json_file, detections)

    assert len(ours.stats) == len(ref.stats) == 12
    np.testing.assert_allclose(ours.stats, ref.stats, rtol=0, atol=1e-9)
    assert 0.05 < ref.stats[0] < 0.95 and min(ref.stats) > 0  # neither trivial nor undefined
    assert ours.eval["precision"].shape == ref.eval["precision"].shape == (10, 101, 5, 4, 3)
    np.testing.assert_allclose(ours.eval["precision"], ref.eval["precision"], rtol=0, atol=1e-12)
    # Detectron2's result dict: AP x 100, and the per-class AP from eval["precision"].
    for key, index in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), range(6)):
        assert abs(results[key] - ref.stats[index] * 100) < 1e-9, key
    for k, category in enumerate(CATEGORY_IDS):
        precision = ref.eval["precision"][:, :, k, 0, -1]
        expected = np.mean(precision[precision > -1]) * 100
        assert abs(results[f"AP-class_{category}"] - expected) < 1e-9, category


@pytest.mark.parametrize("iou_type", ["segm", "keypoints"])
def test_faster_route_matches_pycocotools_for_masks_and_keypoints(iou_type):
    """What Detectron2 would evaluate with it for other models: the same numbers as pycocotools
    (faster-coco-eval's own keypoint categories would differ: the compat class keeps COCO's)."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    evaluator_class = compat._faster_coco_eval_class()
    rng = np.random.default_rng(1)
    images, annotations, results = [], [], []
    for image_id in range(1, 16):
        images.append({"id": image_id, "width": 100, "height": 80})
        for _ in range(4):
            x, y = rng.uniform(0, 50, 2)
            w, h = rng.uniform(5, 45, 2)
            keypoints = np.stack([x + rng.uniform(0, w, 17), y + rng.uniform(0, h, 17)], 1)
            ann = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": int(rng.integers(1, 4)),  # category 4 has no ground truth
                "bbox": [x, y, w, h],
                "area": w * h,
                "iscrowd": 0,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                "keypoints": np.concatenate([keypoints, np.full((17, 1), 2)], 1).ravel().tolist(),
                "num_keypoints": 17,
            }
            annotations.append(ann)
            for _ in range(3):
                result = {"image_id": image_id, "category_id": ann["category_id"]}
                result["score"] = float(rng.random())
                if iou_type == "segm":
                    mask = np.zeros((80, 100), np.uint8, order="F")
                    dy, dx = rng.normal(0, 3, 2)
                    mask[int(y + dy) : int(y + h + dy), int(x + dx) : int(x + w + dx)] = 1
                    rle = mask_utils.encode(mask)
                    rle["counts"] = rle["counts"].decode("utf-8")  # as Detectron2 writes it
                    result["segmentation"] = rle
                else:
                    moved = keypoints + rng.normal(0, 2, keypoints.shape)
                    moved = np.concatenate([moved, np.ones((17, 1))], 1)
                    result["keypoints"] = moved.ravel().tolist()
                results.append(result)
    data = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3, 4)],
    }
    stats = []
    for evaluator in (COCOeval, evaluator_class):
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = json.loads(json.dumps(data))
            gt.createIndex()
            ev = evaluator(gt, gt.loadRes(json.loads(json.dumps(results))), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert ev.eval["precision"].shape[2] == 4  # every category, as Detectron2 asserts
        stats.append(ev.stats)
    assert len(stats[1]) == len(stats[0]) == (12 if iou_type == "segm" else 10)
    assert stats[0][0] > 0.05
    np.testing.assert_allclose(stats[1], stats[0], rtol=0, atol=1e-9)


def test_compat_records_the_faster_coco_eval_route():
    state = compat.COMPAT_STATE
    if compat.has_compiled_ops():
        assert FASTER_ROUTE not in state["patches"] and PYCOCOTOOLS_ROUTE not in state["patches"]
        assert coco_evaluation.COCOeval_opt.__module__.startswith("detectron2")
        return
    from faster_coco_eval import COCOeval_faster

    assert state["compiled_ops"] is False
    assert FASTER_ROUTE in state["patches"] and PYCOCOTOOLS_ROUTE not in state["patches"]
    assert issubclass(coco_evaluation.COCOeval_opt, COCOeval_faster)
    assert fast_eval_api.COCOeval_opt is coco_evaluation.COCOeval_opt


def test_without_faster_coco_eval_pycocotools_evaluates(monkeypatch):
    from pycocotools.cocoeval import COCOeval

    for module in (coco_evaluation, fast_eval_api):  # put back after the test
        monkeypatch.setattr(module, "COCOeval_opt", module.COCOeval_opt)
    monkeypatch.setitem(compat.COMPAT_STATE, "patches", [])
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # not installed

    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append((record.levelno, record.getMessage()))

    handler, level = Records(), compat.logger.level
    compat.logger.addHandler(handler)
    compat.logger.setLevel(logging.INFO)
    try:
        compat._fast_coco_eval_without_compiled_ops()
    finally:
        compat.logger.removeHandler(handler)
        compat.logger.setLevel(level)
    assert compat.COMPAT_STATE["patches"] == [PYCOCOTOOLS_ROUTE]
    assert coco_evaluation.COCOeval_opt is COCOeval and fast_eval_api.COCOeval_opt is COCOeval
    assert len(handler.messages) == 1
    level, message = handler.messages[0]
    assert level == logging.INFO and "pip install faster-coco-eval" in message
    assert "\n" not in message
