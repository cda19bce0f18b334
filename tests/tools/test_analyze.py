"""python -m gfocalv2.analyze: the quality-IoU correlation on a hand-made case against a direct
NumPy computation, the COCO numbers against pycocotools, the plots, running a model first, and the
message of every bad input. Self-contained: each test writes its tiny dataset in tmp_path."""

import contextlib
import io
import json
import os
import runpy
import sys

import numpy as np
import pytest
from PIL import Image

import gfocalv2.analyze as analyze
from gfocalv2.analyze.plots import PLOTS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Ground truth (XYWH). Image 1: A (class 1), B (class 2) and a crowd box of class 1 covering both;
# image 2: C (class 1); image 3: nothing.
GT = [
    (1, 1, [0, 0, 10, 10], 0),  # A
    (1, 2, [20, 20, 10, 10], 0),  # B
    (1, 1, [0, 0, 40, 40], 1),  # crowd: excluded from the best IoU
    (2, 1, [0, 0, 20, 20], 0),  # C
]
# Detections (image, class, box, score) and their best IoU, computed by hand.
DETS = [
    (1, 1, [0, 0, 10, 10], 0.9, 1.0),  # A exactly
    (1, 1, [1, 0, 10, 10], 0.8, 90 / 110),  # A shifted by 1: 9x10 / (100 + 100 - 90)
    (1, 1, [0, 0, 30, 30], 0.4, 100 / 900),  # A inside; with the crowd box it would be 0.5625
    (1, 1, [20, 20, 10, 10], 0.7, 0.0),  # B's box, wrong class: must not match B
    (1, 2, [22, 20, 10, 10], 0.6, 80 / 120),  # B shifted by 2
    (2, 1, [0, 0, 18, 20], 0.5, 360 / 400),  # C
    (2, 1, [2, 2, 20, 20], 0.3, 324 / 476),  # C shifted by (2, 2): 18x18 / (800 - 324)
    (2, 1, [5, 0, 20, 20], 0.65, 300 / 500),  # C shifted by 5
    (3, 2, [0, 0, 5, 5], 0.2, 0.0),  # image without ground truth
]


def write_dataset(folder, name):
    """A COCO json + 3 images of 64x64 under ``folder``; returns the --register-coco args."""
    image_dir = os.path.join(folder, "images")
    os.makedirs(image_dir, exist_ok=True)
    images = []
    for i in (1, 2, 3):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(os.path.join(image_dir, f"{i}.png"))
        images.append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 64})
    anns = [
        {
            "id": k + 1,
            "image_id": img,
            "category_id": c,
            "bbox": box,
            "iscrowd": crowd,
            "area": box[2] * box[3],
        }
        for k, (img, c, box, crowd) in enumerate(GT)
    ]
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    json_file = os.path.join(folder, "gt.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    return [name, json_file, image_dir]


def write_json(path, content, raw=False):
    with open(path, "w") as f:
        f.write(content) if raw else json.dump(content, f)
    return str(path)


def detections(dets=DETS, score_scale=1.0):
    return [
        {"image_id": i, "category_id": c, "bbox": b, "score": s * score_scale}
        for i, c, b, s, _ in dets
    ]


@pytest.fixture
def dataset(tmp_path):
    name = f"analyze_{tmp_path.name}"
    return write_dataset(str(tmp_path / "data"), name)


def run(dataset, results, labels, output, *extra):
    argv = ["--dataset", dataset[0], "--register-coco", *dataset, "--results", *results]
    return analyze.main(argv + ["--labels", *labels, "--output", str(output), *extra])


def test_best_iou_and_coefficients_match_a_direct_computation(dataset, tmp_path):
    a = write_json(tmp_path / "a.json", detections())
    b = write_json(tmp_path / "b.json", detections(score_scale=0.5)[::-1])  # same ranks
    summary = run(dataset, [a, b], ["A", "B"], tmp_path / "out")

    gt = analyze.load_ground_truth(dataset[0], str(tmp_path))
    dets = analyze.load_results(a, gt)
    iou, _ = analyze.best_gt_iou(
        dets.image_id, dets.category_id, dets.box, gt.image_id, gt.category_id, gt.box, gt.crowd
    )
    expected_iou = np.array([d[4] for d in DETS])
    np.testing.assert_allclose(iou, expected_iou, atol=1e-12)

    keep = expected_iou >= 0.5  # 6 detections: the crowd box and the other class are left out
    scores, ious = np.array([d[3] for d in DETS])[keep], expected_iou[keep]
    pearson = np.corrcoef(scores, ious)[0, 1]
    ranks = [np.argsort(np.argsort(v)) for v in (scores, ious)]  # no ties in this case
    spearman = np.corrcoef(*ranks)[0, 1]
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved == summary  # the summary returned is the one written
    for label in ("A", "B"):  # scaling and reordering the scores changes neither coefficient
        s = saved[label]
        assert set(s) == {"pearson", "spearman", "num_detections", "ap", "ap50", "ap75"}
        assert s["num_detections"] == 6
        assert s["pearson"] == pytest.approx(pearson, abs=1e-12)
        assert s["spearman"] == pytest.approx(spearman, abs=1e-12)


def test_ap_is_pycocotools_cocoeval(dataset, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    a = write_json(tmp_path / "a.json", detections())
    summary = run(dataset, [a], ["A"], tmp_path / "out")["A"]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(dataset[1])
        ev = COCOeval(coco, coco.loadRes(a), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    for key, i in (("ap", 0), ("ap50", 1), ("ap75", 2)):
        assert summary[key] == pytest.approx(ev.stats[i] * 100)


def test_every_plot_is_written(dataset, tmp_path, capsys):
    a = write_json(tmp_path / "a.json", detections())
    b = write_json(tmp_path / "b.json", detections()[:5])
    run(dataset, [a, b], ["GFLV2", "GFLV1"], tmp_path / "out")
    for name in PLOTS.values():
        data = (tmp_path / "out" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000, name
    details = json.loads((tmp_path / "out" / "details.json").read_text())["models"]
    assert set(details["GFLV2"]["errors"]["dap"]) == set(analyze.ERROR_TYPES)
    assert sum(details["GFLV2"]["reliability"]["count"]) == len(DETS)
    table = capsys.readouterr().out
    assert "GFLV2" in table and "GFLV1" in table and "pearson" in table


@pytest.mark.parametrize("tta", [False, True])
def test_a_model_runs_first(dataset, tmp_path, tta):
    """--config-file + --opts MODEL.WEIGHTS: evaluated with Trainer.test (with TEST.AUG.ENABLED:
    Trainer.test_with_TTA), then analyzed."""
    import torch

    from gfocalv2.engine import Trainer, build_cfg

    config = os.path.join(REPO, "projects", "DigitScenes", "configs", "gfocalv2_R_18_digits.yaml")
    opts = [
        "MODEL.GFOCAL.NUM_CLASSES",
        "2",
        "MODEL.GFOCAL.SCORE_THRESH_TEST",
        "0.0",
        "DATALOADER.NUM_WORKERS",
        "0",
        "MODEL.DEVICE",
        "cpu",
    ]
    weights = str(tmp_path / "random.pth")
    torch.save({"model": Trainer.build_model(build_cfg(config, opts)).state_dict()}, weights)
    argv = [
        "--dataset",
        dataset[0],
        "--register-coco",
        *dataset,
        "--labels",
        "random",
        "--output",
        str(tmp_path / "out"),
        "--config-file",
        config,
        "--opts",
        *opts,
        "MODEL.WEIGHTS",
        weights,
    ]
    if tta:
        argv += ["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(160, 192)"]
        argv += ["TEST.AUG.MAX_SIZE", "192", "TEST.AUG.FLIP", "False"]
    summary = analyze.main(argv)
    folder = "inference_TTA" if tta else "inference"
    written = tmp_path / "out" / "random" / folder / "coco_instances_results.json"
    assert 0 < len(json.loads(written.read_text())) <= 3 * 100  # 3 images, 100 detections each
    assert set(summary) == {"random"} and (tmp_path / "out" / "summary.json").is_file()


def test_repeated_config_files_each_take_their_opts():
    args = analyze.get_parser().parse_args(
        [
            "--output",
            "o",
            "--config-file",
            "a.yaml",
            "--opts",
            "K",
            "1",
            "--config-file",
            "b.yaml",
            "--opts",
            "K",
            "2",
            "L",
            "3",
            "--labels",
            "A",
            "B",
        ]
    )
    assert args.models == [
        {"config_file": "a.yaml", "opts": ["K", "1"]},
        {"config_file": "b.yaml", "opts": ["K", "2", "L", "3"]},
    ]
    assert args.labels == ["A", "B"]


def error_of(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        analyze.main([str(a) for a in argv])
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        ([dict(d, image_id=99) for d in detections()], "image ids that dataset"),
        ([dict(d, category_id=3) for d in detections()], "category ids [3]"),
        ([], "holds no detections"),
        ("image_id,bbox\n1,2\n", "is not JSON"),
        ({"annotations": []}, "is not a list of detections"),
        ([{"image_id": 1, "category_id": 1, "score": 0.5}], "lacks bbox"),
    ],
    ids=["other-dataset", "unknown-category", "empty", "not-json", "not-a-list", "no-bbox"],
)
def test_bad_results_file(dataset, tmp_path, capsys, content, message):
    path = write_json(tmp_path / "bad.json", content, raw=isinstance(content, str))
    err = error_of(
        capsys,
        "--dataset",
        dataset[0],
        "--register-coco",
        *dataset,
        "--results",
        path,
        "--output",
        tmp_path / "out",
    )
    assert message in err and path in err


def test_bad_labels_dataset_and_missing_file(dataset, tmp_path, capsys):
    a = write_json(tmp_path / "a.json", detections())
    common = ["--register-coco", *dataset, "--output", tmp_path / "out"]
    err = error_of(capsys, "--dataset", dataset[0], "--results", a, "--labels", "X", "Y", *common)
    assert "--labels gives 2 names (X, Y) for 1 models" in err
    err = error_of(
        capsys, "--dataset", dataset[0], "--results", a, a, "--labels", "X", "X", *common
    )
    assert "repeat a name" in err
    err = error_of(capsys, "--results", a, *common)
    assert "Pass --dataset NAME" in err
    err = error_of(capsys, "--dataset", "nowhere", "--results", a, *common)
    assert "--dataset 'nowhere' is not registered" in err
    err = error_of(capsys, "--dataset", dataset[0], "--results", tmp_path / "no.json", *common)
    assert "no.json does not exist" in err
    err = error_of(capsys, "--output", tmp_path / "out", "--opts", "MODEL.WEIGHTS", "w.pth")
    assert "put it after that model's --config-file" in err
    config = os.path.join(REPO, "projects", "DigitScenes", "configs", "gfocalv2_R_18_digits.yaml")
    err = error_of(capsys, "--dataset", dataset[0], *common, "--config-file", config)
    assert "MODEL.WEIGHTS is empty" in err and "--opts MODEL.WEIGHTS" in err
    missing = tmp_path / "missing.pth"
    err = error_of(
        capsys,
        "--dataset",
        dataset[0],
        *common,
        "--config-file",
        config,
        "--opts",
        "MODEL.WEIGHTS",
        missing,
        "MODEL.GFOCAL.NUM_CLASSES",
        "2",
    )
    assert str(missing) in err and "does not exist" in err


def test_command_line_reports_without_traceback(dataset, tmp_path, monkeypatch, capsys):
    """``python -m gfocalv2.analyze`` (its __main__, run in this process): message, exit 2."""
    path = write_json(tmp_path / "bad.json", "not json", raw=True)
    argv = [
        "--dataset",
        dataset[0],
        "--register-coco",
        *dataset,
        "--results",
        path,
        "--output",
        str(tmp_path / "out"),
    ]
    monkeypatch.setattr(sys, "argv", ["python -m gfocalv2.analyze", *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("gfocalv2.analyze", run_name="__main__")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("python -m gfocalv2.analyze: error: Results file") and "is not JSON" in err
    )
