"""Resize parity with the authors' code (issue 13): the reference resizes with OpenCV bilinear
(``mmcv.imresize``, keep ratio) at train and test time, Detectron2's ResizeShortestEdge with PIL
bilinear (which antialiases when shrinking). ``INPUT.RESIZE_BACKEND`` picks one: "cv2-bilinear"
(the published configs) or "pil-bilinear" (Detectron2's, the default of add_gfocalv2_config).
Only the pixel interpolation differs: output sizes and boxes are Detectron2's."""

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from tests.utils.workflow import DIGITS_PROJECT, REPO

from gfocalv2.engine import build_cfg

COCO = REPO / "configs" / "COCO-Detection"
PUBLISHED = sorted(p.name for p in COCO.glob("*.yaml"))
BASE = REPO / "configs" / "Base-GFocalV2.yaml"

#: (h, w, short side, max size): shrink, enlarge, capped by max size, 1-pixel side, identity
CASES = [
    (97, 131, 40, 1333),
    (37, 23, 64, 1333),
    (120, 400, 100, 150),
    (3, 500, 10, 60),
    (50, 70, 50, 1333),
]


def _image(h, w, c=3, seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, c)).astype(dtype)
    return img


def _aug(backend, short, max_size):
    from gfocalv2.data.mapper import SafeResizeShortestEdge

    return SafeResizeShortestEdge((short, short), max_size, backend=backend)


@pytest.mark.parametrize("h, w, short, max_size", CASES)
def test_cv2_path_is_opencv_bilinear_at_detectron2_sizes(h, w, short, max_size):
    from gfocalv2.data.transforms import CV2ResizeTransform

    newh, neww = T.ResizeShortestEdge.get_output_shape(h, w, short, max_size)
    newh, neww = max(1, newh), max(1, neww)
    for c, dtype in [(3, np.uint8), (1, np.uint8), (4, np.uint8), (3, np.float32)]:
        img = _image(h, w, c, seed=h * w, dtype=dtype)
        t = _aug("cv2-bilinear", short, max_size).get_transform(img)
        assert isinstance(t, CV2ResizeTransform) and (t.new_h, t.new_w) == (newh, neww)
        out = t.apply_image(img)
        expected = cv2.resize(img, (neww, newh), interpolation=cv2.INTER_LINEAR)
        if c == 1:
            expected = expected[:, :, None]
        assert out.shape == (newh, neww, c) and out.dtype == img.dtype
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("h, w, short, max_size", CASES)
def test_pil_path_is_unchanged_and_boxes_are_the_same(h, w, short, max_size):
    img = _image(h, w, seed=1)
    today = T.ResizeShortestEdge((short, short), max_size).get_transform(img)
    pil = _aug("pil-bilinear", short, max_size).get_transform(img)
    cv = _aug("cv2-bilinear", short, max_size).get_transform(img)
    if min(today.new_h, today.new_w) > 0:  # Detectron2 produces an empty image for the 1-pixel case
        assert type(pil) is T.ResizeTransform
        np.testing.assert_array_equal(pil.apply_image(img), today.apply_image(img))
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 1, (6, 2)) * [w, h]
    boxes = np.concatenate([xy, xy + rng.uniform(0, 1, (6, 2)) * [w, h]], 1).astype(np.float32)
    np.testing.assert_array_equal(cv.apply_box(boxes.copy()), pil.apply_box(boxes.copy()))
    coords = boxes.reshape(-1, 2)
    np.testing.assert_array_equal(cv.apply_coords(coords.copy()), pil.apply_coords(coords.copy()))
    assert (cv.new_h, cv.new_w) == (pil.new_h, pil.new_w)


def test_the_two_paths_differ_when_shrinking():
    img = _image(200, 300, seed=3)
    pil = _aug("pil-bilinear", 50, 1333).get_transform(img).apply_image(img)
    cv = _aug("cv2-bilinear", 50, 1333).get_transform(img).apply_image(img)
    assert pil.shape == cv.shape and not np.array_equal(pil, cv)


def test_cv2_transform_inverse_and_segmentation():
    from gfocalv2.data.transforms import CV2ResizeTransform

    t = CV2ResizeTransform(40, 60, 20, 30)
    inv = t.inverse()
    assert isinstance(inv, CV2ResizeTransform) and (inv.h, inv.w, inv.new_h, inv.new_w) == (
        20,
        30,
        40,
        60,
    )
    img = _image(20, 30, seed=4)
    np.testing.assert_array_equal(
        inv.apply_image(img), cv2.resize(img, (60, 40), interpolation=cv2.INTER_LINEAR)
    )
    # a segmentation map keeps Detectron2's nearest-neighbour resize (labels are not interpolated)
    seg = np.random.default_rng(5).integers(0, 5, (40, 60)).astype(np.uint8)
    np.testing.assert_array_equal(
        t.apply_segmentation(seg), T.ResizeTransform(40, 60, 20, 30).apply_segmentation(seg)
    )
    # a non-contiguous view (e.g. BGR -> RGB reversed channels) is resized like its copy
    rgb = _image(40, 60, seed=6)[:, :, ::-1]
    np.testing.assert_array_equal(t.apply_image(rgb), t.apply_image(np.ascontiguousarray(rgb)))


# ----------------------------------------------------------------------------- the config key
def test_key_default_is_detectron2s_and_published_configs_use_opencv():
    from detectron2.config import get_cfg

    from gfocalv2 import add_gfocalv2_config

    assert add_gfocalv2_config(get_cfg()).INPUT.RESIZE_BACKEND == "pil-bilinear"
    assert build_cfg("", []).INPUT.RESIZE_BACKEND == "pil-bilinear"
    for path in [BASE] + [COCO / n for n in PUBLISHED]:
        assert (
            build_cfg(str(path), ["MODEL.DEVICE", "cpu"]).INPUT.RESIZE_BACKEND == "cv2-bilinear"
        ), path.name


def test_bad_value_is_refused_when_the_config_is_built(tmp_path):
    pattern = r"INPUT\.RESIZE_BACKEND.*'bicubic'.*'cv2-bilinear'.*'pil-bilinear'"
    with pytest.raises(ValueError, match=pattern):
        build_cfg(str(BASE), ["INPUT.RESIZE_BACKEND", "bicubic"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{BASE}"\nINPUT:\n  RESIZE_BACKEND: "bicubic"\n')
    with pytest.raises(ValueError, match=r"bad\.yaml.*" + pattern):
        build_cfg(str(bad))


def test_mapper_refuses_a_bad_value_set_in_code():
    from gfocalv2.data import RobustDatasetMapper

    cfg = build_cfg("", [], freeze=False)
    cfg.INPUT.RESIZE_BACKEND = "cv2"
    with pytest.raises(ValueError, match=r"INPUT\.RESIZE_BACKEND.*'cv2-bilinear'.*'pil-bilinear'"):
        RobustDatasetMapper(cfg, True)


# ----------------------------------------------------------------- mapper, test loader, predictor
SMALL = [
    "MODEL.DEVICE",
    "cpu",
    "INPUT.MIN_SIZE_TRAIN",
    "(48,)",
    "INPUT.MAX_SIZE_TRAIN",
    "1000",
    "INPUT.MIN_SIZE_TEST",
    "40",
    "INPUT.MAX_SIZE_TEST",
    "1000",
    "INPUT.RANDOM_FLIP",
    "none",
]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("parity_resize") / "img.png"
    Image.fromarray(_image(64, 96, seed=7)).save(path)
    return str(path)


def _record(path):
    return {
        "file_name": path,
        "height": 64,
        "width": 96,
        "image_id": 1,
        "annotations": [
            {"bbox": [10.5, 12.0, 30.0, 20.25], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}
        ],
    }


@pytest.mark.parametrize("is_train, short", [(True, 48), (False, 40)])
def test_mapper_of_the_published_config_resizes_with_opencv(image_file, is_train, short):
    from detectron2.data.detection_utils import read_image

    from gfocalv2.data import RobustDatasetMapper

    cfg = build_cfg(str(COCO / "gfocalv2_R_50_FPN_1x.yaml"), SMALL)
    out = RobustDatasetMapper(cfg, is_train)(_record(image_file))
    rgb = read_image(image_file, format="RGB")
    newh, neww = T.ResizeShortestEdge.get_output_shape(64, 96, short, 1000)
    expected = cv2.resize(rgb, (neww, newh), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), expected)

    pil_cfg = build_cfg(
        str(COCO / "gfocalv2_R_50_FPN_1x.yaml"), SMALL + ["INPUT.RESIZE_BACKEND", "pil-bilinear"]
    )
    pil_out = RobustDatasetMapper(pil_cfg, is_train)(_record(image_file))
    today = T.ResizeShortestEdge((short, short), 1000).get_transform(rgb).apply_image(rgb)
    np.testing.assert_array_equal(pil_out["image"].permute(1, 2, 0).numpy(), today)
    if is_train:
        assert torch.equal(out["instances"].gt_boxes.tensor, pil_out["instances"].gt_boxes.tensor)
        torch.testing.assert_close(
            out["instances"].gt_boxes.tensor,
            torch.tensor([[10.5, 12.0, 40.5, 32.25]]) * 0.75,
            rtol=0,
            atol=1e-5,
        )


def test_test_loader_resizes_with_opencv(coco_dataset):
    from detectron2.data.detection_utils import read_image

    from gfocalv2.data import build_checked_test_loader

    name = coco_dataset("parity_resize_test", sizes=[(64, 48)], boxes_per_image=1, seed=8).name
    cfg = build_cfg(str(BASE), SMALL + ["DATALOADER.NUM_WORKERS", "0"])
    batch = next(iter(build_checked_test_loader(cfg, name)))
    rgb = read_image(batch[0]["file_name"], format="RGB")
    expected = cv2.resize(rgb, (53, 40), interpolation=cv2.INTER_LINEAR)  # (h, w) 48x64 -> 40x53
    np.testing.assert_array_equal(batch[0]["image"].permute(1, 2, 0).numpy(), expected)


def test_predictor_uses_the_key():
    from gfocalv2.data.transforms import CV2ResizeTransform
    from gfocalv2.engine.predictor import Predictor

    tiny = [
        "MODEL.RESNETS.DEPTH",
        "18",
        "MODEL.RESNETS.RES2_OUT_CHANNELS",
        "64",
        "MODEL.FPN.OUT_CHANNELS",
        "64",
        "MODEL.GFOCAL.NUM_CONVS",
        "1",
    ]
    img = _image(60, 90, seed=9)
    for backend, cls in [("cv2-bilinear", CV2ResizeTransform), ("pil-bilinear", T.ResizeTransform)]:
        cfg = build_cfg(str(BASE), SMALL + tiny + ["INPUT.RESIZE_BACKEND", backend])
        predictor = Predictor(cfg)
        t = predictor.aug.get_transform(img)
        assert type(t) is cls and (t.new_h, t.new_w) == (40, 60)
        out = predictor(img)["instances"]
        assert out.image_size == (60, 90)


def test_digit_scenes_images_are_not_resized():
    """DigitScenes (160x160 images, test/train size 160) inherits the published base config: the
    resize is the identity there, whatever the backend."""
    cfg = build_cfg(
        str(DIGITS_PROJECT / "configs" / "gfocalv2_R_18_digits.yaml"), ["MODEL.DEVICE", "cpu"]
    )
    img = _image(160, 160, seed=10)
    for backend in ("cv2-bilinear", "pil-bilinear"):
        t = _aug(backend, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST).get_transform(img)
        np.testing.assert_array_equal(t.apply_image(img), img)
