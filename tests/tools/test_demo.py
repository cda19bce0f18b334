"""python -m gfocalv2.demo: images (files, directories, globs), bad inputs, video."""

import os
import shutil

import numpy as np
import pytest

from tests.utils.workflow import DIGITS_CONFIG, tiny_opts

from gfocalv2 import demo


@pytest.fixture(scope="module")
def setup(tiny_digits, tmp_path_factory):
    """A tiny dataset (registered from the command line) and a checkpoint of an untrained model."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from gfocalv2.engine import build_cfg

    root = tmp_path_factory.mktemp("demo")
    data = tiny_digits
    register = ["--register-coco", "demo_digits_val", *data["val"]]
    opts = tiny_opts(root / "out", "demo_digits_val", "demo_digits_val")
    cfg = build_cfg(str(DIGITS_CONFIG), opts, [("demo_digits_val", *data["val"])])
    weights = root / "model.pth"
    DetectionCheckpointer(build_model(cfg), save_dir=str(root)).save("model")
    assert weights.exists()
    return {
        "root": root,
        "images": data["val"][1],
        "register": register,
        "opts": opts + ["MODEL.WEIGHTS", str(weights)],
    }


def _argv(setup, *extra):
    return [
        "--config-file",
        str(DIGITS_CONFIG),
        *setup["register"],
        *extra,
        "--confidence-threshold",
        "0.0",
        "--opts",
        *map(str, setup["opts"]),
    ]


@pytest.fixture
def fixed_colors(monkeypatch):
    """Detectron2's Visualizer draws each detection in a random colour (``random_color``, from
    NumPy's global generator): one colour instead, so that two drawings of the same detections
    are the same pixels."""
    import detectron2.utils.visualizer as visualizer

    def one_color(rgb=False, maximum=255):
        return np.array([1.0, 0.2, 0.0]) * maximum

    monkeypatch.setattr(visualizer, "random_color", one_color)


def expected_drawing(setup, image_path, threshold=0.0):
    """(the predictor's detections scoring >= threshold on the image, their drawing by
    Detectron2's Visualizer as a BGR image), computed here: what the demo must write."""
    from detectron2.data.detection_utils import read_image
    from detectron2.utils.visualizer import ColorMode, Visualizer

    cfg = demo.setup_demo_cfg(demo.get_parser().parse_args(_argv(setup, "--input", image_path)))
    tool = demo.VisualizationDemo(cfg, threshold)
    bgr = read_image(image_path, format="BGR")
    instances = tool.predictor(bgr)["instances"].to("cpu")
    instances = instances[instances.scores >= threshold]
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    vis = Visualizer(rgb, tool.metadata, instance_mode=ColorMode.IMAGE)
    rgb = vis.draw_instance_predictions(instances).get_image()
    return instances, np.ascontiguousarray(rgb[:, :, ::-1])


def test_demo_writes_images_for_files_dirs_and_globs(setup, tmp_path, fixed_colors):
    images = setup["images"]
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(os.path.join(images, "000000.png"), other / "000000.png")  # same name, other folder
    (tmp_path / "broken.png").write_text("not an image")
    out = tmp_path / "out"
    argv = _argv(
        setup,
        "--input",
        os.path.join(images, "000001.png"),
        str(other),
        os.path.join(images, "00000[23].png"),
        str(tmp_path / "missing.png"),
        str(tmp_path / "broken.png"),
        "--output",
        str(out),
    )
    assert demo.main(argv) == 0
    written = sorted(os.listdir(out))
    assert written == ["000000.png", "000001.png", "000002.png", "000003.png"]
    import cv2

    # Each file is the drawing of the predictor's detections on its own input (PNG: lossless).
    for name, source in [
        ("000000.png", other / "000000.png"),
        ("000001.png", os.path.join(images, "000001.png")),
        ("000003.png", os.path.join(images, "000003.png")),
    ]:
        instances, expected = expected_drawing(setup, str(source))
        assert len(instances) > 0
        original = cv2.imread(str(source))
        assert not np.array_equal(expected, original)  # the detections change the image
        np.testing.assert_array_equal(cv2.imread(str(out / name)), expected, err_msg=name)


def test_demo_single_image_to_file(setup, tmp_path, fixed_colors):
    """``--output`` naming a file: that file, the drawing of the image's detections above the
    threshold (JPEG: compared with the expected drawing encoded the same way)."""
    import cv2

    source = os.path.join(setup["images"], "000000.png")
    all_instances, _ = expected_drawing(setup, source)
    # The median score: the threshold selects about half of the detections.
    threshold = float(all_instances.scores.sort().values[len(all_instances) // 2])
    out = tmp_path / "sub" / "pred.jpg"
    argv = _argv(setup, "--input", source, "--output", str(out))
    argv[argv.index("--confidence-threshold") + 1] = repr(threshold)
    assert demo.main(argv) == 0
    assert os.listdir(tmp_path / "sub") == ["pred.jpg"]
    instances, expected = expected_drawing(setup, source, threshold)
    assert 0 < len(instances) < len(all_instances)
    ok, encoded = cv2.imencode(".jpg", expected)
    assert ok
    np.testing.assert_array_equal(cv2.imread(str(out)), cv2.imdecode(encoded, cv2.IMREAD_COLOR))


def test_expand_inputs_names_the_problems(setup, tmp_path):
    files, problems = demo.expand_inputs(
        [setup["images"], str(tmp_path / "nope.jpg"), str(tmp_path / "*.jpg")]
    )
    assert len(files) == 4
    assert [p[0] for p in problems] == [str(tmp_path / "nope.jpg"), str(tmp_path / "*.jpg")]
    assert "does not exist" in problems[0][1] and "matches no file" in problems[1][1]


def test_demo_fails_when_nothing_is_readable(setup, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    assert (
        demo.main(
            _argv(
                setup,
                "--input",
                str(tmp_path / "bad.png"),
                str(tmp_path / "none"),
                "--output",
                str(tmp_path),
            )
        )
        == 1
    )


def test_demo_missing_weights_are_named(setup, tmp_path):
    argv = [
        "--config-file",
        str(DIGITS_CONFIG),
        "--input",
        setup["images"],
        "--opts",
        "MODEL.DEVICE",
        "cpu",
        "MODEL.WEIGHTS",
        str(tmp_path / "absent.pth"),
    ]
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        demo.main(argv)


def test_demo_video(setup, tmp_path):
    import cv2

    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (64, 64), True)
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write mp4v videos")
    for i in range(3):
        writer.write(cv2.imread(os.path.join(setup["images"], f"00000{i}.png")))
    writer.release()
    out = tmp_path / "out"
    assert demo.main(_argv(setup, "--video-input", str(video), "--output", str(out))) == 0
    result = cv2.VideoCapture(str(out / "clip.mp4"))
    frames = 0
    while result.read()[0]:
        frames += 1
    assert frames == 3


def test_demo_warns_when_class_names_are_unknown(setup, tmp_path):
    """A config whose datasets are not registered: a warning naming them, numbered classes."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("gfocalv2.demo")
    logger.addHandler(handler)
    try:
        argv = _argv(
            setup,
            "--input",
            os.path.join(setup["images"], "000000.png"),
            "--output",
            str(tmp_path / "out"),
        )
        argv += ["DATASETS.TEST", "('unregistered_val',)", "DATASETS.TRAIN", "()"]
        assert demo.main(argv) == 0
    finally:
        logger.removeHandler(handler)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any("Class names unknown" in m and "'unregistered_val'" in m for m in warnings), warnings


def test_digit_scenes_demo_script_help(tmp_path):
    """projects/DigitScenes/demo.py: the demo's flags and --data-root; --help makes no data."""
    import subprocess
    import sys

    from tests.utils.workflow import REPO, env_with_repo_on_pythonpath

    script = REPO / "projects" / "DigitScenes" / "demo.py"
    out = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path),
        env=env_with_repo_on_pythonpath(),  # this checkout's gfocalv2, not the installed one
    )
    assert out.returncode == 0, out.stderr
    for flag in ("--config-file", "--input", "--register-coco", "--opts", "--data-root"):
        assert flag in out.stdout, flag
    assert not (tmp_path / "datasets").exists()


def test_demo_honours_test_time_augmentation(setup):
    """``--opts ... TEST.AUG.ENABLED True``: the demo's predictor runs test-time augmentation;
    its detections are GFocalV2WithTTA's on the image as read, and not the plain model's."""
    import torch
    from detectron2.data.detection_utils import read_image

    from gfocalv2.test_time_augmentation import GFocalV2WithTTA

    aug = ["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(64, 96)", "TEST.AUG.MAX_SIZE", "96"]
    argv = _argv(setup, "--input", os.path.join(setup["images"], "000001.png")) + aug
    cfg = demo.setup_demo_cfg(demo.get_parser().parse_args(argv))
    tool = demo.VisualizationDemo(cfg, 0.0)
    assert tool.predictor.tta is not None
    bgr = read_image(os.path.join(setup["images"], "000001.png"), format="BGR")
    got = tool.predictor(bgr)["instances"]
    rgb = torch.as_tensor(np.ascontiguousarray(bgr[:, :, ::-1].transpose(2, 0, 1)))
    with torch.no_grad():
        (want,) = GFocalV2WithTTA(cfg, tool.predictor.model)([{"image": rgb}])
    want = want["instances"]
    assert len(got) > 0 and torch.equal(got.pred_boxes.tensor, want.pred_boxes.tensor)
    assert torch.equal(got.scores, want.scores)
    plain = demo.VisualizationDemo(
        demo.setup_demo_cfg(demo.get_parser().parse_args(argv[: -len(aug)])), 0.0
    )
    assert plain.predictor.tta is None
    assert not torch.equal(plain.predictor(bgr)["instances"].scores, got.scores)
