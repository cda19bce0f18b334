"""Exported inference graphs (TorchScript trace, ONNX run by onnxruntime) give the PyTorch
model's detections: same boxes, scores and classes within tolerance, on scene-like images."""
import os

import numpy as np
import pytest
import torch

from detectron2.modeling import build_model

from gfocalv2.export import (
    ExportableDetector,
    compare_detections,
    export_onnx,
    export_torchscript,
    load_runner,
    main as export_main,
    pytorch_detections,
)
from tests.utils.models import gfocal_cfg, tiny_config_file

H, W = 96, 128  # multiples of 32; test_padding_and_clipping_inside_graph covers other sizes
COLORS = torch.tensor([[230.0, 40, 40], [40, 200, 40], [40, 60, 230]])


def scene(seed, h=H, w=W, n=4):
    """Coloured rectangles on a noisy dark background, (1, 3, h, w) in [0, 255]."""
    g = torch.Generator().manual_seed(seed)
    image = torch.full((3, h, w), 20.0) + torch.rand(3, h, w, generator=g) * 30
    for _ in range(n):
        bh, bw = (int(v) for v in torch.randint(12, 40, (2,), generator=g))
        y, x = int(torch.randint(0, h - bh, (1,), generator=g)), int(torch.randint(0, w - bw, (1,), generator=g))
        image[:, y : y + bh, x : x + bw] = COLORS[int(torch.randint(0, 3, (1,), generator=g))][:, None, None]
    return image[None]


def varied_model(*opts):
    """A tiny GFLV2 whose scores and boxes vary from location to location and class to
    class (like a trained model's, unlike a fresh one's), with a few dozen detections."""
    torch.manual_seed(0)
    model = build_model(gfocal_cfg("MODEL.PIXEL_STD", [50.0, 50.0, 50.0], *opts, tiny=True)).eval()
    with torch.no_grad():
        model.head.cls_score.weight.normal_(0.0, 0.05)
        model.head.cls_score.bias.fill_(-1.5)
        model.head.bbox_pred.weight.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = varied_model()
    out = tmp_path_factory.mktemp("export")
    sample = scene(0)
    files = {
        "torchscript": export_torchscript(model, sample, str(out / "model.ts")),
        "onnx": export_onnx(model, sample, str(out / "model.onnx")),
    }
    return model, files


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_graph_matches_pytorch(exported, fmt):
    model, files = exported
    run = load_runner(files[fmt])
    counts = []
    for seed in (0, 1, 2):  # the trace image and two unseen ones
        image = scene(seed)
        boxes, scores, classes = expected = pytorch_detections(model, image)
        got_boxes, got_scores, got_classes = got = run(image)
        counts.append(len(boxes))
        assert compare_detections(expected, got) is None, (fmt, seed, compare_detections(expected, got))
        torch.testing.assert_close(got_boxes, boxes, atol=1e-2, rtol=1e-4)
        torch.testing.assert_close(got_scores, scores, atol=1e-5, rtol=1e-4)
        assert torch.equal(got_classes.long(), classes.long())
        assert got_boxes.dtype == torch.float32 and got_classes.dtype == torch.int64
    # There is something to compare: detections of several classes, NMS has work to do.
    assert min(counts) >= 10 and max(counts) <= 100


def test_onnx_graph_contains_nms(exported):
    import onnx

    def op_types(graph):  # including the branches of If nodes (NMS of a non-empty input)
        ops = set()
        for node in graph.node:
            ops.add(node.op_type)
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    ops |= op_types(sub)
        return ops

    _, files = exported
    assert {"NonMaxSuppression", "TopK", "NonZero"} <= op_types(onnx.load(files["onnx"]).graph)


def test_padding_and_clipping_inside_graph(tmp_path):
    """An input whose size is not a multiple of 32: the graph pads like ImageList and clips
    to the unpadded size, as the PyTorch model does."""
    model = varied_model()
    image = scene(3, h=90, w=117)
    run = load_runner(export_onnx(model, image, str(tmp_path / "m.onnx")))
    expected, got = pytorch_detections(model, image), run(image)
    assert len(expected[0]) > 0 and compare_detections(expected, got) is None
    assert got[0][:, 2].max() <= 117 and got[0][:, 3].max() <= 90


def test_gflv1_without_detections(tmp_path):
    """GFLV1 (no DGQP); nothing above the score threshold: empty, well-shaped outputs."""
    model = varied_model("MODEL.GFOCAL.DGQP_ENABLED", False)
    with torch.no_grad():
        model.head.cls_score.bias.fill_(-20.0)
    image = scene(4)
    for path in (export_onnx(model, image, str(tmp_path / "m.onnx")), export_torchscript(model, image, str(tmp_path / "m.ts"))):
        boxes, scores, classes = load_runner(path)(image)
        assert boxes.shape == (0, 4) and scores.shape == (0,) and classes.shape == (0,)


def test_wrapper_is_the_model(exported):
    """Untraced, the export wrapper returns exactly the model's own inference."""
    model, _ = exported
    image = scene(5)
    with torch.no_grad():
        got = ExportableDetector(model)(image)
    assert compare_detections(pytorch_detections(model, image), got, box_atol=0.0, score_atol=0.0) is None


def test_compare_detections_reports_differences():
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20]])
    scores, classes = torch.tensor([0.9, 0.5]), torch.tensor([0, 1])
    assert compare_detections((boxes, scores, classes), (boxes + 0.01, scores, classes)) is None
    assert "boxes" in compare_detections((boxes, scores, classes), (boxes + 1.0, scores, classes))
    assert "scores" in compare_detections((boxes, scores, classes), (boxes, scores + 0.01, classes))
    assert "classes" in compare_detections((boxes, scores, classes), (boxes, scores, classes.flip(0)))
    assert "detections" in compare_detections((boxes, scores, classes), (boxes[:1], scores[:1], classes[:1]))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_command_line_with_sample_image(tmp_path, fmt, caplog):
    from PIL import Image

    image = scene(6, h=120, w=200)[0].permute(1, 2, 0).numpy().astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "sample.png")
    torch.manual_seed(0)
    weights = build_model(gfocal_cfg(tiny=True)).state_dict()
    torch.save({"model": weights}, tmp_path / "w.pth")
    argv = [
        "--config-file", tiny_config_file(tmp_path, "INPUT: {MIN_SIZE_TEST: 96, MAX_SIZE_TEST: 160}\n"),
        "--format", fmt,
        "--output", str(tmp_path / "out"),
        "--sample-image", str(tmp_path / "sample.png"),
        "--opts", "MODEL.WEIGHTS", str(tmp_path / "w.pth"),
    ]
    with caplog.at_level("INFO", logger="gfocalv2.export"):
        assert export_main(argv) == 0
    name = "model.onnx" if fmt == "onnx" else "model.ts"
    assert os.path.isfile(tmp_path / "out" / name)
    # Resized as at test time (shorter side 96, longer side at most 160): 96 x 160.
    assert "1x3x96x160" in caplog.text and "OK" in caplog.text
