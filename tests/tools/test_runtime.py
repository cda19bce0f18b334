"""gfocalv2.runtime: an exported model run with onnxruntime + NumPy + OpenCV gives the PyTorch
Predictor's detections on images of any size, without importing torch or Detectron2, and
refuses bad models and images with a message that names them."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from gfocalv2.engine import build_cfg
from gfocalv2.engine.predictor import Predictor
from gfocalv2.export import compare_detections
from gfocalv2.export import main as export_main
from gfocalv2.runtime import OnnxPredictor, RuntimeInputError, resized_shape
from gfocalv2.runtime import main as runtime_main
from tests.utils.models import REPO, tiny_config_file, varied_model

# The tiny model of tests.utils.models.varied_model, at a test size of 160 (max 256).
EXTRA = "INPUT: {MIN_SIZE_TEST: 160, MAX_SIZE_TEST: 256}\n"
STD = ["MODEL.PIXEL_STD", "[50.0, 50.0, 50.0]"]


def scene_bgr(seed, h, w):
    """Coloured rectangles on a noisy background, (h, w, 3) uint8 BGR."""
    rng = np.random.default_rng(seed)
    image = (20 + rng.random((h, w, 3)) * 30).astype(np.uint8)
    for _ in range(4):
        bh, bw = rng.integers(h // 8, h // 3), rng.integers(w // 8, w // 3)
        y, x = rng.integers(0, h - bh), rng.integers(0, w - bw)
        image[y : y + bh, x : x + bw] = rng.choice([[40, 40, 230], [40, 200, 40], [230, 60, 40]])
    return image


def same_detections(expected, got):
    """None if the runtime's detections are the Predictor's (matched one to one, not in order:
    two scores that tie within the tolerance may come in either order from two runtimes),
    else what differs: same class, box corners within 0.5 px, scores within 1e-3."""
    return compare_detections(
        (expected.pred_boxes.tensor, expected.scores, expected.pred_classes),
        tuple(torch.from_numpy(got[k]) for k in ("boxes", "scores", "classes")),
        box_atol=0.5,
        score_atol=1e-3,
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runtime")
    torch.save({"model": varied_model().state_dict()}, tmp / "w.pth")
    config = tiny_config_file(tmp, EXTRA)
    opts = ["MODEL.WEIGHTS", str(tmp / "w.pth"), *STD]
    argv = ["--config-file", config, "--output", str(tmp / "out"), "--opts", *opts]
    assert export_main(argv) == 0
    cfg = build_cfg(config, opts)
    return str(tmp / "out" / "model.onnx"), cfg, tmp


def test_detections_equal_the_pytorch_predictor(exported):
    path, cfg, _ = exported
    onnx_predictor, predictor = OnnxPredictor(path), Predictor(cfg)
    assert onnx_predictor.input_format == "RGB" and onnx_predictor.min_size_test == 160
    total = 0
    for seed, (h, w) in enumerate([(240, 320), (333, 197), (150, 280), (160, 160)]):
        bgr = scene_bgr(seed, h, w)
        expected = predictor(bgr)["instances"]
        got = onnx_predictor(np.ascontiguousarray(bgr[:, :, ::-1]))
        assert got["boxes"].shape == (len(expected), 4)
        total += len(expected)
        assert same_detections(expected, got) is None, same_detections(expected, got)
        assert got["boxes"][:, 2].max() <= w and got["boxes"][:, 3].max() <= h  # original pixels
    assert total >= 40  # real detections were compared
    assert got["class_names"] == ["0", "1", "2"]  # no dataset registered: class indices


def test_images_of_extreme_aspect_ratio_equal_the_predictor(exported):
    """Issue 22, item 6: at a test size of 160 (max 256), a 97 x 301 image becomes 82 x 256
    and a 40 x 900 one 11 x 256, below P7's stride 128: the runtime takes them (it used to
    refuse them) and gives the Predictor's detections."""
    path, cfg, _ = exported
    onnx_predictor, predictor = OnnxPredictor(path), Predictor(cfg)
    total = 0
    for seed, (h, w) in enumerate([(97, 301), (40, 900), (700, 90)]):
        bgr = scene_bgr(seed + 20, h, w)
        expected = predictor(bgr)["instances"]
        got = onnx_predictor(np.ascontiguousarray(bgr[:, :, ::-1]))
        total += len(expected)
        assert same_detections(expected, got) is None, ((h, w), same_detections(expected, got))
    assert resized_shape(97, 301, 160, 256) == (82, 256)
    assert total >= 20
    assert predictor(np.zeros((20, 2000, 3), np.uint8))["instances"].image_size == (20, 2000)
    assert onnx_predictor(np.zeros((20, 2000, 3), np.uint8))["boxes"].shape[1] == 4


def test_resized_shape_is_detectron2s():
    from detectron2.data.transforms import ResizeShortestEdge

    for h, w in [(480, 640), (640, 480), (100, 3000), (801, 799), (3, 2000)]:
        expected = ResizeShortestEdge.get_output_shape(h, w, 800, 1333)
        assert resized_shape(h, w, 800, 1333) == tuple(max(1, v) for v in expected)


def test_the_runtime_imports_neither_torch_nor_detectron2(exported):
    path, _, _ = exported
    code = (
        "import sys, numpy as np\n"
        "from gfocalv2.runtime import OnnxPredictor\n"
        f"result = OnnxPredictor({path!r})(np.full((200, 300, 3), 90, np.uint8))\n"
        "print(sorted(result), 'torch' in sys.modules, 'detectron2' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [
        "['boxes',",
        "'class_names',",
        "'classes',",
        "'scores']",
        "False",
        "False",
    ]


def test_bad_model_files_are_named(exported, tmp_path):
    path, _, tmp = exported
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        OnnxPredictor(str(tmp_path / "missing.onnx"))
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(open(path, "rb").read()[:5000])
    with pytest.raises(RuntimeInputError, match="corrupt.onnx.*not ONNX"):
        OnnxPredictor(str(corrupt))
    import onnx

    proto = onnx.load(path)
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    with pytest.raises(RuntimeInputError, match="plain.onnx lacks the metadata"):
        OnnxPredictor(str(tmp_path / "plain.onnx"))


def test_bad_images_are_named(exported):
    predictor = OnnxPredictor(exported[0])
    for image, message in [
        (np.zeros((50, 60), np.uint8), r"\(H, W, 3\) RGB, got shape \(50, 60\)"),
        (np.zeros((50, 60, 4), np.uint8), r"got shape \(50, 60, 4\)"),
        (np.zeros((0, 60, 3), np.uint8), "empty"),
        (np.zeros((50, 60, 3), np.float32), "uint8"),
        ([[1, 2, 3]], "NumPy array"),
    ]:
        with pytest.raises(RuntimeInputError, match=message):
            predictor(image)


def test_command_line_draws_and_names_unreadable_files(exported, tmp_path, capsys):
    path, _, _ = exported
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), scene_bgr(1, 200, 260))
    cv2.imwrite(str(images / "b.jpg"), scene_bgr(2, 300, 180))
    (images / "c.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    status = runtime_main([path, "--input", str(images), "--output", str(out)])
    captured = capsys.readouterr()
    assert status == 1  # one file could not be read
    assert "c.png: skipped: cannot read" in captured.err
    assert "a.png:" in captured.out and "detections" in captured.out
    for name in ("a.png", "b.jpg"):
        drawn = cv2.imread(str(out / name))
        assert drawn is not None and drawn.shape[:2] == cv2.imread(str(images / name)).shape[:2]
    assert runtime_main([str(tmp_path / "nope.onnx"), "--input", str(images)]) == 2


def test_metadata_names_the_config(exported):
    meta = OnnxPredictor(exported[0]).metadata
    assert json.loads(meta["gfocalv2.class_names"]) == ["0", "1", "2"]
    assert meta["gfocalv2.architecture"] == "GFocalV2" and "REG_MAX: 8" in meta["gfocalv2.config"]


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the training subprocess's own limit is 1500 s
def test_trained_digit_scenes_model_equals_the_predictor(tmp_path):
    """A DigitScenes GFocalV2 trained for 300 iterations (a few minutes), exported: the runtime's
    detections on validation images equal the Predictor's."""
    out = tmp_path / "train"
    env = {**os.environ, "PYTHONPATH": REPO}
    train = [sys.executable, os.path.join(REPO, "projects/DigitScenes/train_digits.py")]
    opts = ["SOLVER.MAX_ITER", "300", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", str(out)]
    subprocess.run(train + opts, check=True, cwd=REPO, env=env, timeout=1500, capture_output=True)
    config = os.path.join(REPO, "projects/DigitScenes/configs/gfocalv2_R_18_digits.yaml")
    weights = ["MODEL.WEIGHTS", str(out / "model_final.pth")]
    assert (
        export_main(["--config-file", config, "--output", str(tmp_path), "--opts", *weights]) == 0
    )
    predictor = Predictor(build_cfg(config, weights))
    onnx_predictor = OnnxPredictor(str(tmp_path / "model.onnx"))
    val = os.path.join(REPO, "datasets", "digit_scenes", "val")
    total = 0
    for name in sorted(os.listdir(val))[:10]:
        bgr = cv2.imread(os.path.join(val, name))
        expected = predictor(bgr)["instances"]
        got = onnx_predictor(np.ascontiguousarray(bgr[:, :, ::-1]))
        total += len(expected)
        assert same_detections(expected, got) is None, same_detections(expected, got)
    assert total >= 20
