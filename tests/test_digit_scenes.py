"""DigitScenes: deterministic generation, tight in-image boxes, valid COCO json, registration."""

import hashlib
import json
import os

import numpy as np
import pytest

from tests.utils.workflow import TINY_PARAMS

from projects.DigitScenes.digit_scenes import CLASS_NAMES, prepare, register_digit_scenes


def _tree_digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            h.update(f.encode())
            with open(os.path.join(dirpath, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return prepare(str(tmp_path_factory.mktemp("digits") / "a"), TINY_PARAMS)


def test_generation_is_deterministic(tiny, tmp_path):
    again = prepare(str(tmp_path / "b"), TINY_PARAMS)
    assert _tree_digest(tiny) == _tree_digest(again)
    other = prepare(str(tmp_path / "c"), {**TINY_PARAMS, "seed": 1})
    with open(os.path.join(tiny, "train.json")) as f1, open(
        os.path.join(other, "train.json")
    ) as f2:
        assert json.load(f1)["annotations"] != json.load(f2)["annotations"]


def test_cache_is_reused_and_regenerated_when_params_change(tiny):
    png = os.path.join(tiny, "train", "000000.png")
    mtime = os.stat(png).st_mtime_ns
    assert prepare(tiny, TINY_PARAMS) == tiny
    assert os.stat(png).st_mtime_ns == mtime  # cached: not rewritten
    changed = {**TINY_PARAMS, "num_val": 3}
    prepare(tiny, changed)
    assert len(os.listdir(os.path.join(tiny, "val"))) == 3
    prepare(tiny, TINY_PARAMS)  # restore for the other tests
    with open(os.path.join(tiny, "STAMP.json")) as f:
        stamp = json.load(f)
    assert stamp["params"]["seed"] == 0 and "generator_version" in stamp


def test_coco_json_is_valid(tiny):
    from pycocotools.coco import COCO

    for split, n in (("train", TINY_PARAMS["num_train"]), ("val", TINY_PARAMS["num_val"])):
        coco = COCO(os.path.join(tiny, f"{split}.json"))
        assert len(coco.getImgIds()) == n
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASS_NAMES
        ann_ids = coco.getAnnIds()
        assert len(ann_ids) >= n and len(set(ann_ids)) == len(ann_ids)
        for img in coco.loadImgs(coco.getImgIds()):
            assert os.path.isfile(os.path.join(tiny, split, img["file_name"]))
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            assert 1 <= len(anns) <= TINY_PARAMS["max_digits"]
            for a in anns:
                assert a["iscrowd"] == 0 and a["area"] == a["bbox"][2] * a["bbox"][3]


def test_boxes_are_tight_and_inside():
    """Each box is exactly the bounding box of its digit's ink (the pixels the digit changed)."""
    from projects.DigitScenes.digit_scenes.generate import (
        DEFAULT_PARAMS,
        _draw_scene,
        _load_digits,
        _split_indices,
    )

    params = {**DEFAULT_PARAMS, **TINY_PARAMS, "image_size": 96, "max_digits": 5}
    glyphs, labels = _load_digits()
    pool, _ = _split_indices(len(glyphs), 0)
    rng = np.random.default_rng(7)
    n_boxes = 0
    for _ in range(20):
        img, boxes, classes, ink = _draw_scene(rng, glyphs, labels, pool, params)
        assert img.shape == (96, 96, 3) and img.dtype == np.uint8
        assert len(boxes) == len(classes) >= 1
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
            ys, xs = np.nonzero(ink == i + 1)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
            assert 0.6 * params["min_size"] <= y1 - y0 <= params["max_size"]
            n_boxes += 1
        # the drawn ink is visible: darker than the scene on average
        grey = img.astype(np.float32).mean(axis=2)
        assert grey[ink > 0].mean() < grey[ink == 0].mean() - 30
    assert n_boxes >= 20


def test_splits_use_disjoint_handwriting():
    from projects.DigitScenes.digit_scenes.generate import _split_indices

    train, val = _split_indices(1797, 0)
    assert len(set(train) & set(val)) == 0 and len(train) + len(val) == 1797


def test_register_digit_scenes(tiny):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    names = register_digit_scenes(tiny, TINY_PARAMS, prefix="test_digits")
    assert names == ["test_digits_train", "test_digits_val"]
    assert MetadataCatalog.get("test_digits_val").thing_classes == CLASS_NAMES
    dicts = DatasetCatalog.get("test_digits_train")
    assert len(dicts) == TINY_PARAMS["num_train"]
    classes = np.concatenate([[a["category_id"] for a in d["annotations"]] for d in dicts])
    assert classes.min() >= 0 and classes.max() <= 9  # contiguous ids 0..9 for "0".."9"
    assert register_digit_scenes(tiny, TINY_PARAMS, prefix="test_digits") == names  # idempotent


def test_crowded_scenes_overlap_within_their_limits():
    """The crowded variant: many digits at varied scales whose boxes overlap (IoU <= 0.5), each
    box still the extent of one digit whose strokes stay visible."""
    from projects.DigitScenes.digit_scenes.generate import (
        CROWDED_PARAMS,
        DEFAULT_PARAMS,
        _draw_scene,
        _load_digits,
        _split_indices,
    )

    params = {**DEFAULT_PARAMS, **CROWDED_PARAMS}
    glyphs, labels = _load_digits()
    pool, _ = _split_indices(len(glyphs), 0)
    rng = np.random.default_rng(3)
    counts, max_ious, heights = [], [], []
    for _ in range(30):
        _, boxes, classes, ink = _draw_scene(rng, glyphs, labels, pool, params)
        b = np.asarray(boxes)
        counts.append(len(b))
        heights += list(b[:, 3] - b[:, 1])
        # IoU of every pair, written out here
        x0, y0 = np.maximum(b[:, None, 0], b[None, :, 0]), np.maximum(b[:, None, 1], b[None, :, 1])
        x1, y1 = np.minimum(b[:, None, 2], b[None, :, 2]), np.minimum(b[:, None, 3], b[None, :, 3])
        inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        iou = inter / (area[:, None] + area[None, :] - inter)
        np.fill_diagonal(iou, 0)
        max_ious += list(iou.max(axis=1))
        for i, (bx0, by0, bx1, by1) in enumerate(boxes):
            ys, xs = np.nonzero(ink == i + 1)  # its visible ink: inside its box, spanning most
            assert bx0 <= xs.min() and xs.max() < bx1 and by0 <= ys.min() and ys.max() < by1
            assert xs.max() + 1 - xs.min() >= 0.8 * (bx1 - bx0)
            assert ys.max() + 1 - ys.min() >= 0.8 * (by1 - by0)
    max_ious = np.asarray(max_ious)
    assert max_ious.max() <= CROWDED_PARAMS["max_box_iou"] + 1e-9
    assert (max_ious > 0).mean() > 0.3 and (max_ious > 0.1).mean() > 0.03  # they do overlap
    assert np.mean(counts) > 8 and max(counts) <= CROWDED_PARAMS["max_digits"]
    assert min(heights) < 16 and max(heights) > 48  # wider than DigitScenes' 16-56


def test_default_scenes_unchanged_by_the_crowded_options(tiny):
    """The new parameters' defaults draw what DigitScenes drew before them: digits 2 px apart
    (and the same files, which test_generation_is_deterministic pins within a version)."""
    with open(os.path.join(tiny, "train.json")) as f:
        coco = json.load(f)
    boxes = {}
    for a in coco["annotations"]:
        boxes.setdefault(a["image_id"], []).append(a["bbox"])
    for bs in boxes.values():
        for i, (x, y, w, h) in enumerate(bs):
            for x2, y2, w2, h2 in bs[i + 1 :]:
                apart = x + w + 2 <= x2 or x2 + w2 + 2 <= x or y + h + 2 <= y2 or y2 + h2 + 2 <= y
                assert apart


def test_variants_are_registered_by_the_names_a_config_uses(tmp_path):

    from projects.DigitScenes.digit_scenes import VARIANTS, register_variants, variant_of

    assert variant_of("digit_scenes_crowded_val") == "digit_scenes_crowded"
    assert variant_of("digit_scenes_train") == "digit_scenes"
    assert variant_of("coco_2017_val") is None and variant_of("digit_scenes_crowded") is None
    assert set(VARIANTS) == {"digit_scenes", "digit_scenes_crowded"}
    register_variants(["coco_2017_train"], str(tmp_path / "digit_scenes"))
    assert not (tmp_path / "digit_scenes").exists()  # nothing of DigitScenes used: no data
