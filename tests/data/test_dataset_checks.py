"""Bad datasets: each case either continues with a warning naming the cause, or stops at
start-up with an error naming the file and what to do."""

import copy
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.utils.reliability import (
    capture_logs,
    dump,
    make_trainer,
    messages,
    register,
    tiny_cfg,
    write_coco,
)

from gfocalv2.data import (
    DataLoadingError,
    DatasetError,
    ImageLoadError,
    RobustDatasetMapper,
    RobustMapDataset,
    diagnose_coco_json,
    load_dataset_dicts,
)
from gfocalv2.engine import build_cfg


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    json_path, image_dir, data = write_coco(
        root, sizes=[(64, 64), (80, 48), (48, 80), (64, 64), (64, 56), (72, 64)]
    )
    return {"root": root, "json": json_path, "images": image_dir, "data": data}


def _variant(coco, tmp_path, name, edit):
    data = copy.deepcopy(coco["data"])
    edit(data)
    path = dump(data, tmp_path / f"{name}.json")
    return register(name, path, coco["images"])


# ----------------------------------------------------------------- the json itself
@pytest.mark.parametrize(
    "content, expected",
    [
        ("this is not json", "is not valid JSON"),
        ("[1, 2, 3]", "is a JSON list, not a COCO object"),
        ('{"images": []}', "has no 'categories' list"),
        ('{"annotations": [], "categories": []}', "has no 'images' list"),
        (
            '{"images": [{"id": 1}], "categories": []}',
            "images[0] lacks ['file_name', 'width', 'height']",
        ),
    ],
)
def test_non_coco_json_is_an_error_naming_the_file(coco, tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_text(content)
    name = register("rel_bad_json", path, coco["images"])
    with pytest.raises(DatasetError) as e:
        load_dataset_dicts([name])
    assert str(path) in str(e.value) and expected in str(e.value)
    assert expected in diagnose_coco_json(str(path))


def test_unknown_category_id_is_an_error_listing_ids(coco, tmp_path):
    def edit(d):
        d["annotations"][0]["category_id"] = 42
        d["annotations"][1]["category_id"] = 42

    name = _variant(coco, tmp_path, "rel_unknown_cat", edit)
    with pytest.raises(
        DatasetError,
        match=r"category_id is not in 'categories': 42 \(2 annotations\); known ids: \[1, 2, 5\]",
    ):
        load_dataset_dicts([name])


def test_dataset_without_images_is_an_error(coco, tmp_path):
    name = _variant(coco, tmp_path, "rel_no_images", lambda d: d.update(images=[], annotations=[]))
    with pytest.raises(
        DatasetError, match=r"'rel_no_images' \(.*rel_no_images.json\) has no images"
    ):
        load_dataset_dicts([name])


def test_unregistered_dataset_is_an_error():
    with pytest.raises(DatasetError, match="'nope_never_registered' is not registered"):
        load_dataset_dicts(["nope_never_registered"])


# ----------------------------------------------------------------- image files
def test_missing_images_dropped_for_training_error_for_evaluation(coco, tmp_path):
    def edit(d):
        d["images"][1]["file_name"] = "gone_1.png"
        d["images"][2]["file_name"] = "gone_2.png"

    name = _variant(coco, tmp_path, "rel_missing", edit)
    with capture_logs() as logs:
        dicts = load_dataset_dicts([name], is_train=True)
    assert len(dicts) == 4
    warning = messages(logs)
    assert (
        "2 of 6 images do not exist" in warning
        and "gone_1.png" in warning
        and "gone_2.png" in warning
    )
    with pytest.raises(
        DatasetError, match=r"used for evaluation: 2 of 6 images do not exist: .*gone_1.png"
    ):
        load_dataset_dicts([name], is_train=False)


def test_all_images_missing_names_the_image_directory(coco, tmp_path):
    name = register("rel_wrong_dir", coco["json"], tmp_path / "not_the_images")
    with pytest.raises(DatasetError, match=r"none of its 6 image files exist .*not_the_images"):
        load_dataset_dicts([name])


def test_size_check_at_load_reads_headers(coco, tmp_path):
    def edit(d):
        d["images"][0]["width"] = 100

    name = _variant(coco, tmp_path, "rel_size", edit)
    assert (
        len(load_dataset_dicts([name], check_images="exists")) == 6
    )  # not checked without reading
    with capture_logs() as logs:
        dicts = load_dataset_dicts([name], check_images="size")
    assert len(dicts) == 5
    assert "img_0.png is 64x64, the json says 100x64" in messages(logs)
    with pytest.raises(DatasetError, match="img_0.png is 64x64, the json says 100x64"):
        load_dataset_dicts([name], is_train=False, check_images="size")


# ----------------------------------------------------------------- annotations
def test_bad_boxes_are_dropped_or_clipped_with_a_warning(coco, tmp_path):
    def edit(d):
        a = d["annotations"]
        a[0]["bbox"] = [10, 10, 0, 5]  # zero width
        a[1]["bbox"] = [10, 10, 5, -3]  # negative height
        a[2]["bbox"] = [200, 200, 10, 10]  # entirely outside (image 2 is 80x48)
        a[3]["bbox"] = [70, 40, 30, 40]  # partly outside 80x48: clipped to [70, 40, 10, 8]

    name = _variant(coco, tmp_path, "rel_boxes", edit)
    with capture_logs() as logs:
        dicts = load_dataset_dicts([name])
    text = messages(logs)
    assert "2 annotations with zero or negative width/height were dropped" in text
    assert "img_0.png bbox [10, 10, 0, 5]" in text and "img_0.png bbox [10, 10, 5, -3]" in text
    assert "1 annotations entirely outside their image were dropped" in text
    assert "1 boxes extending outside their image were clipped" in text
    assert [len(d["annotations"]) for d in dicts[:2]] == [0, 1]
    assert dicts[1]["annotations"][0]["bbox"] == [70.0, 40.0, 10.0, 8.0]
    # every remaining box is inside its image with positive size
    for d in dicts:
        for a in d["annotations"]:
            x, y, w, h = a["bbox"]
            assert (
                w > 0
                and h > 0
                and x >= 0
                and y >= 0
                and x + w <= d["width"]
                and y + h <= d["height"]
            )


def test_empty_annotation_lists(coco, tmp_path):
    def some_empty(d):
        d["annotations"] = [a for a in d["annotations"] if a["image_id"] > 2]

    name = _variant(coco, tmp_path, "rel_some_empty", some_empty)
    assert len(load_dataset_dicts([name], filter_empty=False)) == 6
    assert len(load_dataset_dicts([name], filter_empty=True)) == 4

    name = _variant(coco, tmp_path, "rel_all_empty", lambda d: d.update(annotations=[]))
    with pytest.raises(
        DatasetError, match="none of the 6 images has a .*box left.*FILTER_EMPTY_ANNOTATIONS"
    ):
        load_dataset_dicts([name], filter_empty=True)
    with capture_logs() as logs:
        assert len(load_dataset_dicts([name], filter_empty=False)) == 6
    assert "no image has a box" in messages(logs)


def test_training_on_images_without_boxes_has_finite_losses(coco, tmp_path):
    name = _variant(
        coco, tmp_path, "rel_train_empty", lambda d: d.update(annotations=d["annotations"][:1])
    )
    cfg = tiny_cfg(
        tmp_path / "out",
        name,
        name,
        max_iter=2,
        extra=["DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False", "TEST.EVAL_PERIOD", "0"],
    )
    trainer = make_trainer(cfg)
    trainer.train()  # a non-finite loss would raise
    assert (tmp_path / "out" / "model_final.pth").exists()


# ----------------------------------------------------------------- the mapper
def _truncate(path):
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 3])


def test_mapper_errors_name_the_file(coco, tmp_path):
    cfg = build_cfg("", ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64"])
    mapper = RobustDatasetMapper(cfg, True)
    good = load_dataset_dicts([register("rel_map", coco["json"], coco["images"])])[0]
    assert mapper(good)["image"].shape[0] == 3

    broken = tmp_path / "truncated.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(broken)
    _truncate(broken)
    for record, expected in [
        (dict(good, file_name=str(tmp_path / "nope.png")), r"nope.png does not exist"),
        (
            dict(good, file_name=str(broken)),
            r"truncated.png cannot be used \((OSError|SyntaxError|UnidentifiedImageError)",
        ),
        (dict(good, width=65), r"img_0.png: its size is 64x64 but the json says 65x64"),
    ]:
        with pytest.raises(ImageLoadError, match=expected):
            mapper(record)


def test_training_skips_unreadable_images_and_bounds_failures(coco, tmp_path):
    cfg = build_cfg("", ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64"])
    dicts = load_dataset_dicts([register("rel_skip", coco["json"], coco["images"])])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    dicts[2] = dict(dicts[2], file_name=str(broken))
    dataset = RobustMapDataset(
        dicts, RobustDatasetMapper(cfg, True), seed=1, max_consecutive_failures=3
    )
    with capture_logs() as logs:
        out = dataset[(2, 0)]
    assert out["file_name"] != str(broken) and out["image"].shape[0] == 3
    assert "Skipping training image" in messages(logs) and "broken.png" in messages(logs)
    assert dataset.num_failures >= 1
    # the replacement is deterministic
    assert dataset[(2, 0)]["file_name"] == out["file_name"]

    all_broken = [dict(d, file_name=str(broken)) for d in dicts]
    dataset = RobustMapDataset(
        all_broken, RobustDatasetMapper(cfg, True), seed=1, max_consecutive_failures=3
    )
    with pytest.raises(
        DataLoadingError,
        match=r"(?s)4 training images in a row could not be loaded.*"
        r"MAX_CONSECUTIVE_FAILURES is 3.*broken.png",
    ):
        dataset[(0, 0)]


def test_a_run_with_a_truncated_image_finishes_with_a_warning(coco_dataset, tmp_path):
    name, _, image_dir, _ = coco_dataset("rel_trunc_train", sizes=[(64, 64)] * 4)
    _truncate(os.path.join(image_dir, "img_1.png"))
    cfg = tiny_cfg(
        tmp_path / "out",
        name,
        name,
        max_iter=4,
        extra=["TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()"],
    )
    with capture_logs() as logs:
        make_trainer(cfg).train()
    assert "Skipping training image" in messages(logs) and "img_1.png" in messages(logs)
    ckpt = torch.load(tmp_path / "out" / "model_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 3


def test_repeat_factors_with_and_without_square_root():
    """DATALOADER.REPEAT_SQRT (Detectron2 after v0.6; True is v0.6's behaviour):
    r = max(1, (t / f)^p)."""
    from gfocalv2.data.loader import _repeat_factors

    # category 1 in 1 of 4 images (f = 0.25), category 2 in all 4 (f = 1)
    dicts = [{"annotations": [{"category_id": 1}, {"category_id": 2}]}] + [
        {"annotations": [{"category_id": 2}]}
    ] * 3
    t = 1.0
    assert _repeat_factors(dicts, t).tolist() == pytest.approx(
        [max(1.0, (t / 0.25) ** 0.5), 1.0, 1.0, 1.0]
    )
    assert _repeat_factors(dicts, t, sqrt=False).tolist() == pytest.approx(
        [max(1.0, t / 0.25), 1.0, 1.0, 1.0]
    )
