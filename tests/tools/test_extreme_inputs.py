"""Inference on extreme inputs: 1x1, very large, gray, RGBA, extreme aspect ratios, through
the model, the Predictor (DefaultPredictor replacement) and the demo tool."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.utils.reliability import DIGITS_CONFIG, tiny_opts

from gfocalv2.engine import build_cfg

EXTREME = {
    "1x1": (1, 1, 3),
    "gray": (48, 40),
    "gray_1_channel": (40, 48, 1),
    "rgba": (40, 48, 4),
    "1x3000": (1, 3000, 3),
    "3000x2": (3000, 2, 3),
    "very_large": (3000, 4000, 3),
}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    out = tmp_path_factory.mktemp("infer")
    return build_cfg(
        str(DIGITS_CONFIG),
        tiny_opts(out, "x", "y") + ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()"],
    )


@pytest.fixture(scope="module")
def predictor(cfg):
    from gfocalv2.engine.predictor import Predictor

    torch.manual_seed(0)
    return Predictor(cfg)


def _check(instances, h, w):
    assert instances.image_size == (h, w)
    boxes = instances.pred_boxes.tensor
    assert torch.isfinite(boxes).all() and torch.isfinite(instances.scores).all()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert (instances.scores >= 0).all() and (instances.scores <= 1).all()


@pytest.mark.parametrize("name", list(EXTREME))
def test_predictor_on_extreme_inputs(predictor, name):
    shape = EXTREME[name]
    image = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    out = predictor(image)["instances"]
    _check(out, shape[0], shape[1])
    assert len(out) > 0  # SCORE_THRESH_TEST 0 in tiny_opts: the random model does answer


def test_rgba_drops_alpha_and_gray_equals_replicated_rgb(predictor):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, rng.integers(0, 255, (40, 48, 1), dtype=np.uint8)], axis=2)
    a, b = predictor(rgb)["instances"], predictor(rgba)["instances"]
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)
    gray = rgb[:, :, 0]
    a, b = (
        predictor(gray)["instances"],
        predictor(np.repeat(gray[:, :, None], 3, axis=2))["instances"],
    )
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)


@pytest.mark.parametrize("shape", [(0, 10, 3), (10, 0), (4, 4, 2), (2, 2, 2, 3)])
def test_predictor_rejects_unusable_arrays_naming_the_shape(predictor, shape):
    with pytest.raises(ValueError, match=r"shape \(" + ", ".join(str(s) for s in shape)):
        predictor(np.zeros(shape, np.uint8))


def test_model_directly_on_tiny_and_thin_images(cfg):
    from detectron2.modeling import build_model

    from tests.utils.models import instances

    # FPN with 64 channels (DigitScenes' own): GroupNorm(32) over 32 channels cannot normalize a
    # 1x1 map (one value per group), a limit of that tiny test setting, not of the model.
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    torch.manual_seed(0)
    model = build_model(cfg)
    model.eval()
    with torch.no_grad():
        for h, w in [(1, 1), (1, 700), (700, 2), (3, 5)]:
            out = model([{"image": torch.rand(3, h, w) * 255}])[0]["instances"]
            _check(out, h, w)
    model.train()
    batch = [
        {
            "image": torch.rand(3, 1, 300) * 255,
            "instances": instances((1, 300), torch.zeros(0, 4), []),
        },
        {"image": torch.rand(3, 8, 8) * 255, "instances": instances((8, 8), [[0, 0, 8, 8]], [1])},
    ]
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values()), losses


def test_training_mapper_on_extreme_aspect_ratio(cfg, tmp_path):
    from gfocalv2.data import RobustDatasetMapper

    path = tmp_path / "thin.png"
    Image.fromarray(np.full((2, 3000, 3), 128, np.uint8)).save(path)
    record = {
        "file_name": str(path),
        "height": 2,
        "width": 3000,
        "image_id": 1,
        "annotations": [{"bbox": [10, 0, 500, 2], "bbox_mode": 1, "category_id": 0, "iscrowd": 0}],
    }
    out = RobustDatasetMapper(cfg, True)(record)
    assert (
        out["image"].shape[1] >= 1 and out["image"].shape[2] == 64
    )  # long side at MAX_SIZE_TRAIN, short side >= 1


def test_demo_tool_on_gray_rgba_tiny_and_thin_files(cfg, tmp_path):
    from detectron2.modeling import build_model

    from gfocalv2 import demo
    from gfocalv2.checkpoint import GFocalCheckpointer

    weights_dir = tmp_path / "w"
    GFocalCheckpointer(build_model(cfg), save_dir=str(weights_dir)).save("model")
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8), mode="L").save(
        inputs / "gray.png"
    )
    Image.fromarray(rng.integers(0, 255, (40, 30, 4), dtype=np.uint8), mode="RGBA").save(
        inputs / "rgba.png"
    )
    Image.fromarray(rng.integers(0, 255, (1, 1, 3), dtype=np.uint8)).save(inputs / "one.png")
    Image.fromarray(rng.integers(0, 255, (2, 2000, 3), dtype=np.uint8)).save(inputs / "thin.png")
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint16)).save(inputs / "gray16.png")
    out = tmp_path / "out"
    status = demo.main(
        [
            "--config-file",
            str(DIGITS_CONFIG),
            "--input",
            str(inputs),
            "--output",
            str(out),
            "--opts",
            "MODEL.WEIGHTS",
            str(weights_dir / "model.pth"),
            "MODEL.DEVICE",
            "cpu",
            "INPUT.MIN_SIZE_TEST",
            "64",
            "INPUT.MAX_SIZE_TEST",
            "64",
            "MODEL.FPN.OUT_CHANNELS",
            "32",
            "MODEL.GFOCAL.NUM_CONVS",
            "1",
            "DATASETS.TEST",
            "()",
            "DATASETS.TRAIN",
            "()",
        ]
    )
    assert status == 0
    for name in ("gray.png", "rgba.png", "one.png", "thin.png", "gray16.png"):
        drawn = np.asarray(Image.open(out / name))
        src = Image.open(inputs / name)
        assert drawn.shape[:2] == (src.height, src.width), name
