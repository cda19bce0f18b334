"""Helpers of the reliability tests: tiny COCO datasets written on the fly (with the faults
the tests need), a tiny fast config, and log capture independent of logger set-up."""

import contextlib
import json
import logging
import os

import numpy as np
from PIL import Image

from tests.utils.workflow import DIGITS_CONFIG, tiny_opts  # noqa: F401  (DIGITS_CONFIG: for the tests)

CATEGORIES = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 5, "name": "c"}]

#: Image sizes of both aspect-ratio groups, for the tests of the training data order.
VARIED_SIZES = [(64, 64), (80, 48), (48, 80), (64, 64), (72, 56), (56, 72), (64, 48), (64, 64)]
# multi-scale + flips + aspect-ratio grouping: every source of data randomness is exercised
RANDOM_INPUT = [
    "INPUT.RANDOM_FLIP",
    "horizontal",
    "INPUT.MIN_SIZE_TRAIN",
    "(40, 48, 56, 64)",
    "INPUT.MIN_SIZE_TRAIN_SAMPLING",
    "choice",
    "DATALOADER.ASPECT_RATIO_GROUPING",
    "True",
]


def write_coco(
    root, sizes=((64, 64),) * 6, boxes_per_image=2, seed=0, name="data", categories=CATEGORIES
):
    """Images of the given (width, height) with bright rectangles, and their COCO json.

    Returns (json_path, image_dir, data) where data is the json dict (to tweak and re-dump).
    """
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(str(root), name)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for i, (w, h) in enumerate(sizes):
        img = np.full((h, w, 3), 30, np.uint8)
        file_name = f"img_{i}.png"
        for _ in range(boxes_per_image):
            bw, bh = int(rng.integers(8, max(9, w // 2))), int(rng.integers(8, max(9, h // 2)))
            x, y = int(rng.integers(0, max(1, w - bw))), int(rng.integers(0, max(1, h - bh)))
            img[y : y + bh, x : x + bw] = rng.integers(120, 255, 3)
            cat = categories[int(rng.integers(0, len(categories)))]["id"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "bbox": [x, y, bw, bh],
                    "category_id": cat,
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
        Image.fromarray(img).save(os.path.join(image_dir, file_name))
        images.append({"id": i + 1, "file_name": file_name, "width": w, "height": h})
    data = {"images": images, "annotations": annotations, "categories": list(categories)}
    json_path = os.path.join(str(root), f"{name}.json")
    dump(data, json_path)
    return json_path, image_dir, data


def dump(data, path):
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def register(name, json_path, image_dir):
    """Register (or re-register) a COCO dataset under ``name``."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(json_path), str(image_dir))
    return name


def small_opts(output_dir, train, test, max_iter=4, num_classes=3, extra=()):
    """tiny_opts for our 3-class datasets."""
    return tiny_opts(output_dir, train, test, max_iter=max_iter) + [
        "MODEL.GFOCAL.NUM_CLASSES",
        str(num_classes),
        "SEED",
        "7",
        *extra,
    ]


def tiny_cfg(output_dir, train, test, max_iter=4, num_classes=3, extra=()):
    from gfocalv2.engine import build_cfg

    return build_cfg(
        str(DIGITS_CONFIG), small_opts(output_dir, train, test, max_iter, num_classes, extra)
    )


def make_trainer(cfg, resume=False):
    """What train_net does (seeds as default_setup would), without the logging set-up."""
    from detectron2.utils.env import seed_all_rng

    from gfocalv2.engine import Trainer

    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)  # as default_setup does
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    return trainer


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def capture_logs(*names):
    """Records of the given loggers (and their children), whatever their propagation settings."""
    handler = _ListHandler()
    loggers = [logging.getLogger(n) for n in (names or ("gfocalv2",))]
    old = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        for lg, level in old:
            lg.removeHandler(handler)
            lg.setLevel(level)


def messages(handler, level=logging.WARNING):
    return "\n".join(r.getMessage() for r in handler.records if r.levelno >= level)


def training_cfg(out, dataset, max_iter, extra=()):
    """:func:`tiny_cfg` for training only on ``dataset`` (no test set, no evaluation), with a
    short warm-up, a step at iteration 5 and random-input augmentations."""
    return tiny_cfg(
        out,
        dataset,
        dataset,
        max_iter=max_iter,
        extra=[*TRAINING_ONLY_OPTS, *extra],
    )


#: The overrides of :func:`training_cfg`, for tests that build their own command line.
TRAINING_ONLY_OPTS = [
    "TEST.EVAL_PERIOD",
    "0",
    "DATASETS.TEST",
    "()",
    "SOLVER.WARMUP_ITERS",
    "3",
    "SOLVER.STEPS",
    "(5,)",
    *RANDOM_INPUT,
]
