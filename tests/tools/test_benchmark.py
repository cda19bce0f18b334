"""gfocalv2.benchmark runs end to end on a tiny config and reports what it promises (no
speed assertions: timings on shared machines are noise)."""

import json

import pytest
import torch

from detectron2.modeling import build_model

from gfocalv2.benchmark import (
    Stopwatch,
    add_synthetic_logits,
    main as benchmark_main,
    split_backward,
)
from tests.utils.models import gfocal_cfg, random_input, tiny_config_file


def run(tmp_path, capsys, *args):
    out = tmp_path / "summary.json"
    summary = benchmark_main(
        [
            "--config-file",
            tiny_config_file(tmp_path),
            "--num-iter",
            "2",
            "--threads",
            "1",
            "--input-size",
            "64",
            "96",
            "--json",
            str(out),
            *args,
        ]
    )
    text = capsys.readouterr().out
    return summary, text, json.loads(out.read_text())


def test_inference_compare_all(tmp_path, capsys):
    summary, text, saved = run(
        tmp_path, capsys, "--task", "inference", "--compare", "retinanet,fcos,gfl", "--flops"
    )
    assert list(summary) == ["gfocalv2", "retinanet", "fcos", "gfl"]  # every comparison model built
    assert "median_s" in text and "fps" in text and "gfocalv2/model" in text
    for name in ("retinanet", "fcos", "gfl"):
        e = summary[name]
        assert e["ratio_ours_over_this"] > 0 and e["min_s"] <= e["median_s"] <= e["max_s"]
        assert e["images_per_s"] == pytest.approx(1.0 / e["per_image_s"])
        assert f"postprocess share {name}:" in text
    for e in summary.values():
        assert list(e["stages_s"]) == ["preprocess", "backbone", "head", "postprocess"]
        assert sum(e["stage_share"].values()) == pytest.approx(1.0, abs=0.05)
    assert saved["summary"]["gfocalv2"]["median_s"] == pytest.approx(
        summary["gfocalv2"]["median_s"]
    )
    assert "round 2 retinanet" in text and "warm-up" in text  # interleaved rounds are logged
    # FLOPs: GFLV1 and GFLV2 differ only by the DGQP (a few MFLOPs); RetinaNet's head (9 anchors)
    # is larger.
    f = {name: e["flops"] for name, e in summary.items()}
    assert f["gfl"]["backbone_gflops"] == f["gfocalv2"]["backbone_gflops"]
    assert 0 < f["gfocalv2"]["head_gflops"] - f["gfl"]["head_gflops"] < 0.01
    assert f["retinanet"]["head_gflops"] > f["gfocalv2"]["head_gflops"]
    assert "GFLOPs retinanet: backbone+FPN" in text


@pytest.mark.parametrize("mode", ["ours", "all", "none"])
def test_optimize_applies_to_the_models_it_names(mode):
    from collections import OrderedDict

    from detectron2.layers import FrozenBatchNorm2d

    from gfocalv2.benchmark import apply_inference_optimizations
    from gfocalv2.modeling.baselines import detectron2_retinanet

    cfg = gfocal_cfg("MODEL.RESNETS.NORM", "FrozenBN", tiny=True)
    models = OrderedDict(gfocalv2=build_model(cfg), retinanet=detectron2_retinanet(cfg))
    described = apply_inference_optimizations(models, cfg, mode)
    optimized = {"ours": {"gfocalv2"}, "all": {"gfocalv2", "retinanet"}, "none": set()}[mode]
    for name, model in models.items():
        has_bn = any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
        assert has_bn == (name not in optimized), name
        assert (described[name] == "as built") == (name not in optimized)
        assert model.backbone.bottom_up.stem.conv1.weight.is_contiguous(
            memory_format=torch.channels_last
        ) == (
            name in optimized  # TEST.MEMORY_FORMAT "auto" on CPU
        )


def test_train_breakdown(tmp_path, capsys):
    summary, text, _ = run(
        tmp_path,
        capsys,
        "--task",
        "train",
        "--compare",
        "retinanet",
        "--num-gt",
        "5",
        "--timer",
        "cpu",
    )
    assert "cpu time" in text
    expected = [
        "preprocess",
        "backbone+head forward",
        "targets",
        "losses forward",
        "losses backward",
        "backbone+head backward",
        "optimizer",
    ]
    for name in ("gfocalv2", "retinanet"):
        assert list(summary[name]["stages_s"]) == expected
        assert f"train share {name}: targets+losses (fwd+bwd)" in text
    assert "outside backbone+head fwd/bwd" in text


def test_gflv1_config_is_ours(tmp_path, capsys):
    out = tmp_path / "s.json"
    summary = benchmark_main(
        [
            "--config-file",
            tiny_config_file(tmp_path),
            "--num-iter",
            "1",
            "--warmup",
            "0",
            "--input-size",
            "64",
            "64",
            "--compare",
            "gfocalv2",
            "--json",
            str(out),
            "MODEL.GFOCAL.DGQP_ENABLED",
            "False",
        ]
    )
    assert list(summary) == ["gfl", "gfocalv2"] and "ratio_ours_over_this" in summary["gfocalv2"]


def test_data_loader(tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    coco = {
        "images": [],
        "annotations": [],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    for i in range(3):
        Image.new("RGB", (80, 60), (i * 40, 100, 200)).save(images / f"{i}.png")
        coco["images"].append({"id": i, "file_name": f"{i}.png", "height": 60, "width": 80})
        coco["annotations"].append(
            {
                "id": i,
                "image_id": i,
                "category_id": 1 + i % 2,
                "bbox": [10, 10, 30, 20],
                "area": 600,
                "iscrowd": 0,
            }
        )
    (tmp_path / "train.json").write_text(json.dumps(coco))
    summary = benchmark_main(
        [
            "--config-file",
            tiny_config_file(tmp_path),
            "--task",
            "data",
            "--num-iter",
            "2",
            "--register-coco",
            "bench_tiny",
            str(tmp_path / "train.json"),
            str(images),
            "DATASETS.TRAIN",
            "('bench_tiny',)",
            "DATALOADER.NUM_WORKERS",
            "0",
            "SOLVER.IMS_PER_BATCH",
            "2",
            "INPUT.MIN_SIZE_TRAIN",
            "(64,)",
        ]
    )
    text = capsys.readouterr().out
    assert "data loader: median_s" in text and summary["data"]["median_s"] > 0


def test_synthetic_logits_give_the_requested_candidates():
    """--detections K: about K (location, class) pairs per image above the score threshold."""
    model = build_model(gfocal_cfg(tiny=True)).eval()
    assert add_synthetic_logits(model, 300, (128, 160))
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, 128, 160))
        cls_logits, _, _ = model.head([features[f] for f in model.head_in_features])
    confident = sum(int((c.sigmoid() > 0.1 - 1e-6).sum()) for c in cls_logits)
    assert 280 <= confident <= 320


@pytest.mark.parametrize("dgqp", [True, False])
def test_split_backward_equals_backward(dgqp):
    """The timed two-part backward gives the gradients of one loss.backward() (GFLV2's
    quality logits are computed from its box logits: no double counting)."""
    g = torch.Generator().manual_seed(0)
    model = build_model(gfocal_cfg("MODEL.GFOCAL.DGQP_ENABLED", dgqp, tiny=True))
    model.train()
    batch = [random_input(g, 64, 96, 4, 3)]

    def grads(split):
        model.zero_grad(set_to_none=True)
        images = model.preprocess_image(batch)
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        predictions = model.head(features)
        loss = sum(
            model.forward_training(
                images, features, predictions, [x["instances"] for x in batch]
            ).values()
        )
        if split:
            split_backward(loss, predictions, Stopwatch(torch.device("cpu")))
        else:
            loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole, parts = grads(False), grads(True)
    assert set(whole) == set(parts) and any("dgqp" in n for n in whole) == dgqp
    for name in whole:
        torch.testing.assert_close(parts[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)
