"""Exported inference graphs (ONNX run by onnxruntime, torch.export programs) give the PyTorch
model's detections at any input size: same boxes, scores and classes within tolerance, on
scene-like images of sizes that are and are not multiples of 32, portrait and landscape."""

import os

import numpy as np
import onnx
import pytest
import torch
from detectron2.modeling import build_model

from gfocalv2.export import (
    check_sizes,
    compare_detections,
    export_onnx,
    export_program,
    load_runner,
    pytorch_detections,
)
from gfocalv2.export import main as export_main
from gfocalv2.modeling.deploy import DeployableGFocalV2
from gfocalv2.modeling.detections import class_wise_nms
from tests.utils.models import gfocal_cfg, tiny_config_file

COLORS = torch.tensor([[230.0, 40, 40], [40, 200, 40], [40, 60, 230]])
# a multiple of 32, then portrait and landscape sizes that are not
SIZES = [(160, 192), (205, 139), (131, 263)]


def scene(seed, h=160, w=192, n=4):
    """Coloured rectangles on a noisy dark background, (1, 3, h, w) in [0, 255]."""
    g = torch.Generator().manual_seed(seed)
    image = torch.full((3, h, w), 20.0) + torch.rand(3, h, w, generator=g) * 30
    for _ in range(n):
        bh, bw = (int(v) for v in torch.randint(12, min(40, h - 1, w - 1), (2,), generator=g))
        y = int(torch.randint(0, h - bh, (1,), generator=g))
        x = int(torch.randint(0, w - bw, (1,), generator=g))
        color = COLORS[int(torch.randint(0, 3, (1,), generator=g))]
        image[:, y : y + bh, x : x + bw] = color[:, None, None]
    return image[None]


def varied_model(*opts):
    """A tiny GFLV2 whose scores and boxes vary from location to location and class to
    class (like a trained model's, unlike a fresh one's), with a few dozen detections."""
    torch.manual_seed(0)
    cfg = gfocal_cfg("MODEL.PIXEL_STD", [50.0, 50.0, 50.0], *opts, tiny=True)
    model = build_model(cfg).eval()
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
        "onnx": export_onnx(model, sample, str(out / "model.onnx"), {"gfocalv2.test": "yes"}),
        "pt2": export_program(model, sample, str(out / "model.pt2")),
    }
    return model, files


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_exported_graph_matches_pytorch_at_any_size(exported, fmt):
    model, files = exported
    run = load_runner(files[fmt])
    counts = []
    for seed, (h, w) in enumerate(SIZES):
        image = scene(seed + 1, h, w)
        expected = pytorch_detections(model, image)
        got = run(image, model.test_score_thresh)
        counts.append(len(expected[0]))
        assert compare_detections(expected, got) is None, (
            fmt,
            (h, w),
            compare_detections(expected, got),
        )
    assert min(counts) >= 10, counts  # real detections were compared


LOAD_IN_A_FRESH_PROCESS = """
import sys
import torch
{imports}
program, image, output = sys.argv[1:]
module = torch.export.load(program).module()
with torch.no_grad():
    torch.save(tuple(module(torch.load(image), torch.tensor(0.05))), output)
"""


def load_in_a_fresh_process(program, image, tmp_path, imports):
    """Runs the ``.pt2`` program on ``image`` in a new Python process that first runs
    ``imports``; returns (the process, its (boxes, scores, classes) or None)."""
    import subprocess
    import sys

    from tests.utils.workflow import env_with_repo_on_pythonpath

    torch.save(image, tmp_path / "image.pt")
    output = tmp_path / "detections.pt"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_IN_A_FRESH_PROCESS.format(imports=imports),
            program,
            str(tmp_path / "image.pt"),
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
        env=env_with_repo_on_pythonpath(),  # this checkout's gfocalv2
    )
    return proc, torch.load(output) if output.exists() else None


def test_pt2_loads_in_a_fresh_process_after_importing_the_nms_operator(exported, tmp_path):
    """A ``.pt2`` program loads and runs in a process other than the one that exported it, once
    ``gfocalv2.modeling.deploy`` is imported (it registers ``gfocalv2::class_wise_nms``; importing
    ``gfocalv2`` alone does not), and gives the exporting process's detections. Without that
    import, ``torch.export.load`` fails and names the operator."""
    model, files = exported
    image = scene(5, 150, 170)
    proc, got = load_in_a_fresh_process(
        files["pt2"],
        image,
        tmp_path,
        "from gfocalv2 import compat; compat.apply(); import gfocalv2.modeling.deploy",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = pytorch_detections(model, image, 0.05)
    assert len(expected[0]) >= 10  # real detections
    assert compare_detections(expected, got) is None, compare_detections(expected, got)

    (tmp_path / "without").mkdir()
    proc, got = load_in_a_fresh_process(files["pt2"], image, tmp_path / "without", "")
    assert proc.returncode != 0 and got is None
    assert "gfocalv2.class_wise_nms" in proc.stderr


def test_score_threshold_is_an_input(exported):
    model, files = exported
    run = load_runner(files["onnx"])
    image = scene(4, 150, 170)
    low = run(image, 0.01)
    threshold = float(np.quantile(np.asarray(low[1]), 0.75))  # a quarter of them stay
    high = run(image, threshold)
    assert 0 < len(high[0]) < len(low[0])
    assert compare_detections(pytorch_detections(model, image, threshold), high) is None
    assert float(high[1].min()) > threshold


def test_onnx_graph_has_dynamic_size_per_class_nms_and_metadata(exported):
    _, files = exported
    proto = onnx.load(files["onnx"])
    image = proto.graph.input[0]
    dims = image.type.tensor_type.shape.dim
    assert image.name == "image" and dims[0].dim_value == 1 and dims[1].dim_value == 3
    assert dims[2].dim_param and dims[3].dim_param  # symbolic height and width
    assert [i.name for i in proto.graph.input] == ["image", "score_threshold"]
    ops = {n.op_type for n in proto.graph.node}
    for f in proto.functions:
        ops |= {n.op_type for n in f.node}
    assert "NonMaxSuppression" in ops
    assert {p.key: p.value for p in proto.metadata_props}["gfocalv2.test"] == "yes"


def test_class_wise_nms_matches_a_direct_computation():
    """Per class: candidates above the threshold, greedy by score, IoU > 0.5 suppressed, at most
    2 kept per class; computed here with a plain loop."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(30, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 10 + torch.rand(30, 2, generator=g) * 20], 1)
    scores = torch.rand(3, 30, generator=g)
    got = class_wise_nms(boxes, scores, torch.tensor(0.3), 0.5, 2)

    def iou(a, b):
        lt, rb = torch.maximum(a[:2], b[:2]), torch.minimum(a[2:], b[2:])
        inter = (rb - lt).clamp(min=0).prod()
        return inter / ((a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter)

    rows = []
    for c in range(3):
        order = [int(i) for i in scores[c].argsort(descending=True) if scores[c, i] > 0.3]
        kept = []
        for i in order:
            if all(iou(boxes[i], boxes[j]) <= 0.5 for j in kept):
                kept.append(i)
        rows += [[0, c, i] for i in kept[:2]]
    assert got.tolist() == rows


def test_gflv1_and_random_weights(tmp_path):
    """GFLV1 (no DGQP) exports too; a fresh model detects nothing above 0.05 and the graph
    returns empty (0, 4) / (0,) outputs, not an error."""
    torch.manual_seed(0)
    cfg = gfocal_cfg("MODEL.GFOCAL.DGQP_ENABLED", False, tiny=True)
    model = build_model(cfg).eval()
    image = scene(3)
    run = load_runner(export_onnx(model, image, str(tmp_path / "m.onnx")))
    boxes, scores, classes = run(image, 0.05)
    assert boxes.shape == (0, 4) and scores.shape == (0,) and classes.shape == (0,)
    low = pytorch_detections(model, image, 0.004)
    assert len(low[0]) > 0 and compare_detections(low, run(image, 0.004)) is None


def test_deployable_graph_is_the_model(exported):
    model, _ = exported
    for h, w in SIZES:
        image = scene(7, h, w)
        with torch.no_grad():
            got = DeployableGFocalV2(model)(image)
        expected = pytorch_detections(model, image)
        assert compare_detections(expected, got, box_atol=1e-4, score_atol=1e-6) is None


def test_compare_detections_reports_differences():
    boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20]])
    scores, classes = torch.tensor([0.9, 0.8]), torch.tensor([1, 2])
    same = (boxes, scores, classes)
    assert compare_detections(same, (boxes + 0.01, scores, classes)) is None
    swapped = (boxes.flip(0), scores.flip(0), classes.flip(0))
    assert compare_detections(same, swapped) is None  # matched, not compared in order
    assert "px" in compare_detections(same, (boxes + 1.0, scores, classes))
    assert "score" in compare_detections(same, (boxes, scores + 0.01, classes))
    assert "class" in compare_detections(same, (boxes, scores, torch.tensor([1, 1])))
    assert "detections" in compare_detections(same, (boxes[:1], scores[:1], classes[:1]))


def test_check_sizes_are_not_multiples_of_32_and_change_orientation():
    for h, w, min_size in [(800, 1216, 129), (160, 160, 33), (160, 160, 129), (64, 96, 33)]:
        sizes = check_sizes(h, w, min_size)
        assert sizes[0] == (h, w)
        (ph, pw), (lh, lw) = sizes[1:]
        assert ph > pw and lw > lh, sizes
        assert all(s % 32 and s >= min_size for s in (ph, pw, lh, lw)), sizes
    # a strip below the coarsest stride, for the ONNX graph
    assert check_sizes(800, 1216, 1, thin=96)[3] == (96, 1217)


def test_onnx_takes_images_below_the_coarsest_stride(exported):
    """The ONNX graph takes every size the PyTorch model takes (issue 22, item 6): strips whose
    coarsest level (P7, stride 128) has a single row, tiny images, a 1-pixel side; the same
    detections as PyTorch. (The torch.export program checks torch.export's guards: from 129.)"""
    model, files = exported
    run = load_runner(files["onnx"])
    compared = 0
    # (random pixels for the tiny ones; not a 3 x 900 noise strip: its 100 detections hold score
    # ties within 1e-6 at the limit, which float rounding orders either way)
    for seed, (h, w) in enumerate([(82, 256), (97, 301), (50, 700), (40, 20), (1, 40), (2, 2)]):
        image = scene(seed + 10, h, w) if min(h, w) > 41 else torch.rand(1, 3, h, w) * 255
        expected = pytorch_detections(model, image)
        got = run(image, model.test_score_thresh)
        compared += len(expected[0])
        assert compare_detections(expected, got) is None, (
            (h, w),
            compare_detections(expected, got),
        )
    assert compared >= 100


def test_command_line_writes_metadata_and_checks_real_detections(tmp_path, caplog):
    """Random weights: the check lowers the threshold to compare real detections, and says so."""
    from PIL import Image

    image = scene(6, h=150, w=250)[0].permute(1, 2, 0).numpy().astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "sample.png")
    torch.manual_seed(0)
    torch.save({"model": build_model(gfocal_cfg(tiny=True)).state_dict()}, tmp_path / "w.pth")
    argv = [
        "--config-file",
        tiny_config_file(tmp_path, "INPUT: {MIN_SIZE_TEST: 160, MAX_SIZE_TEST: 240}\n"),
        "--output", str(tmp_path / "out"),
        "--sample-image", str(tmp_path / "sample.png"),
        "--opts", "MODEL.WEIGHTS", str(tmp_path / "w.pth"),
    ]  # fmt: skip
    with caplog.at_level("INFO", logger="gfocalv2.export"):
        assert export_main(argv) == 0
    path = tmp_path / "out" / "model.onnx"
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["gfocalv2.input_format"] == "RGB" and meta["gfocalv2.min_size_test"] == "160"
    assert meta["gfocalv2.max_size_test"] == "240" and meta["gfocalv2.score_threshold"] == "0.05"
    assert meta["gfocalv2.min_input_size"] == "1"  # any size (not P7's stride + 1)
    assert len(eval(meta["gfocalv2.class_names"])) == 3 and "GFOCAL" in meta["gfocalv2.config"]
    # resized as at test time (shorter side 160, longer at most 240): 150x250 -> 144x240
    # and a strip below P7's stride 128 (3 x 128 / 4 = 96 high)
    assert "144x240" in caplog.text and "96x" in caplog.text and caplog.text.count("OK") == 4
    assert "compared at" in caplog.text  # the lowered threshold is reported
    assert "MISMATCH" not in caplog.text


def test_command_line_names_a_missing_weight_file(tmp_path):
    argv = [
        "--config-file", tiny_config_file(tmp_path),
        "--output", str(tmp_path / "out"),
        "--opts", "MODEL.WEIGHTS", str(tmp_path / "missing.pth"),
    ]  # fmt: skip
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        export_main(argv)
    assert not os.path.exists(tmp_path / "out" / "model.onnx")
