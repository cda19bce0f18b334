"""tools/dgqp_study.py: its statistics against hand-computed values, its command line, and a
whole (tiny) study: two seeds x GFocalV2 / GFL (V1) trained, measured, reported, then reused."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.utils.workflow import (
    REPO,
    env_with_repo_on_pythonpath,
    load_tool,
    make_tiny_dataset,
    tiny_opts,
)

dgqp_study = load_tool("dgqp_study")


def test_sign_flip_p_value_by_hand():
    # All 5 of one sign, distinct sizes: only "all +" and "all -" reach |mean| -> 2 / 32.
    assert dgqp_study.sign_flip_p_value([0.5, 1.0, 0.2, 2.0, 0.1]) == pytest.approx(2 / 32)
    # (3, 1, -1): observed |sum| 3; sums of the 8 flips: +-5, +-3, +-3, +-1 -> 6 of 8.
    assert dgqp_study.sign_flip_p_value([3.0, 1.0, -1.0]) == pytest.approx(6 / 8)
    assert dgqp_study.sign_flip_p_value([1.0, -1.0]) == 1.0


def test_paired_bootstrap_matches_the_standard_error():
    """For many pairs the percentile interval approaches mean +- 1.96 x (the bootstrap standard
    error of a mean: the population sd / sqrt(n)); a constant difference has no spread."""
    d = np.random.default_rng(0).normal(0.7, 2.0, size=400)
    lo, hi = dgqp_study.paired_bootstrap(d, 20000)
    se = d.std(ddof=0) / np.sqrt(len(d))
    assert lo == pytest.approx(d.mean() - 1.96 * se, abs=0.15 * se)
    assert hi == pytest.approx(d.mean() + 1.96 * se, abs=0.15 * se)
    assert dgqp_study.paired_bootstrap([0.3] * 5, 100) == pytest.approx((0.3, 0.3))
    # same seed, same interval (the report is reproducible)
    assert dgqp_study.paired_bootstrap(d[:5], 500) == dgqp_study.paired_bootstrap(d[:5], 500)


def test_summary_pairs_seeds_and_skips_missing_correlations():
    nan = float("nan")
    per_run = {
        "gfocalv2": {
            0: {"ap": 50.0, "ap50": 60.0, "ap75": 40.0, "pearson": 0.8, "spearman": nan},
            1: {"ap": 52.0, "ap50": 60.0, "ap75": 45.0, "pearson": 0.7, "spearman": 0.5},
            2: {
                "ap": 60.0,
                "ap50": 60.0,
                "ap75": 60.0,
                "pearson": 0.9,
                "spearman": 0.9,
            },  # no GFL pair
        },
        "gfl": {
            0: {"ap": 49.0, "ap50": 60.0, "ap75": 41.0, "pearson": 0.6, "spearman": 0.4},
            1: {"ap": 54.0, "ap50": 60.0, "ap75": 42.0, "pearson": 0.5, "spearman": 0.6},
        },
    }
    s = dgqp_study.summarize(per_run, [0, 1, 2], 200)
    assert s["seeds"] == [0, 1]
    ap = s["metrics"]["ap"]
    assert ap["difference"] == pytest.approx(((50 - 49) + (52 - 54)) / 2)
    assert ap["gfocalv2"]["mean"] == 51.0 and ap["gfl"]["std"] == pytest.approx(
        np.std([49, 54], ddof=1)
    )
    assert ap["leads"] == 1 and ap["pairs"] == 2 and ap["sign_flip_p"] == 1.0
    assert s["metrics"]["ap75"]["leads"] == 1  # 40 < 41, 45 > 42
    sp = s["metrics"]["spearman"]  # seed 0 has no GFocalV2 value: one pair, no interval
    assert sp["pairs"] == 1 and sp["difference"] == pytest.approx(-0.1)
    assert "bootstrap_95" not in sp


def test_overrides_are_not_read_as_seeds_or_datasets():
    args = dgqp_study.parse_args(["--seeds", "3", "4", "SOLVER.MAX_ITER", "10", "SEED", "1"])
    assert args.seeds == [3, 4] and args.opts == ["SOLVER.MAX_ITER", "10", "SEED", "1"]
    args = dgqp_study.parse_args(["--datasets", "a", "b", "MODEL.GFOCAL.REG_MAX", "8"])
    assert args.datasets == ["a", "b"] and args.opts == ["MODEL.GFOCAL.REG_MAX", "8"]


def _write_results(run, gt, shift):
    """A results file for ``run``: every ground-truth box, shifted right by ``shift`` pixels,
    scored by its resulting IoU; and the run marked finished."""
    os.makedirs(os.path.join(run["out"], "inference"), exist_ok=True)
    dets = []
    for a in gt:
        x, y, w, h = a["bbox"]
        iou = max(w - shift, 0) * h / (w * h + shift * h)
        box = [x + shift, y, w, h]
        dets.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": box})
        dets[-1]["score"] = iou
    with open(os.path.join(run["out"], dgqp_study.RESULTS), "w") as f:
        json.dump(dets, f)
    dgqp_study.mark_done(run["out"], run["cmd"])


def test_report_of_finished_runs_and_their_checkpoints(tmp_path):
    """The measuring and reporting half on runs written here: boxes shifted by a known amount
    give known AP and correlations, GFocalV2's closer to the truth than GFL's."""
    data = make_tiny_dataset(tmp_path / "digits")
    argv = ["--seeds", "0", "1", "--datasets", "tiny", "--output", str(tmp_path / "s"), "--curve"]
    for split in ("train", "val"):
        argv += ["--register-coco", f"tiny_{split}", *data[split]]
    args = dgqp_study.parse_args(argv + ["SOLVER.MAX_ITER", "4"])
    dgqp_study.register_coco_datasets(args.register_coco)
    with open(data["val"][0]) as f:
        gt = json.load(f)["annotations"]
    runs = dgqp_study.plan_runs(args)
    assert [(r["detector"], r["seed"]) for r in runs] == [
        ("gfocalv2", 0),
        ("gfl", 0),
        ("gfocalv2", 1),
        ("gfl", 1),
    ]
    assert all(r["cmd"][-4:] == ["SOLVER.MAX_ITER", "4", "OUTPUT_DIR", r["out"]] for r in runs)
    assert not any(dgqp_study._is_done(r["out"], r["cmd"]) for r in runs)
    for r in runs:  # exact boxes for GFocalV2, 1 px off for GFL (V1)
        _write_results(r, gt, 0 if r["detector"] == "gfocalv2" else 1)
        open(os.path.join(r["out"], "model_0000001.pth"), "w").close()  # a checkpoint
    evals = dgqp_study.plan_curve(args, runs)
    assert [e["iteration"] for e in evals] == [2] * 4
    assert all("--eval-only" in e["cmd"] and e["cmd"][-4] == "MODEL.WEIGHTS" for e in evals)
    for e in evals:  # at iteration 2 GFocalV2 is the one off
        _write_results(e, gt, 3 if e["detector"] == "gfocalv2" else 0)
    report = dgqp_study.build_report(args, runs + evals)["datasets"]["tiny"]

    assert report["runs"]["gfocalv2"]["0"]["ap"] == pytest.approx(100.0)
    assert report["runs"]["gfocalv2"]["0"]["ap75"] == pytest.approx(100.0)
    # 1 px shifts of boxes >= 12 px wide keep IoU > 0.75: AP75 100, AP below 100 (AP90, AP95)
    assert report["runs"]["gfl"]["1"]["ap75"] == pytest.approx(100.0)
    assert report["runs"]["gfl"]["1"]["ap"] < 100.0
    m = report["summary"]["metrics"]
    assert m["ap"]["difference"] == pytest.approx(100.0 - report["runs"]["gfl"]["0"]["ap"])
    assert m["ap"]["leads"] == 2 and m["ap"]["bootstrap_95"][0] > 0
    assert m["pearson"]["pairs"] == 0  # exact boxes: every IoU is 1, no correlation defined
    # the scores are the IoUs: the shifted runs correlate perfectly
    assert report["runs"]["gfl"]["0"]["pearson"] == pytest.approx(1.0)
    assert report["curve"]["2"]["metrics"]["ap"]["difference"] < 0
    text = dgqp_study.format_report({"command": "x", "datasets": {"tiny": report}})
    assert "| 2 | -" in text and "| final | +" in text


def _run_study(args, timeout):
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "dgqp_study.py"), *args],
        env=env_with_repo_on_pythonpath(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow  # 8 processes: about 2 min on 2 idle cores
@pytest.mark.timeout(900)
def test_a_tiny_study_trains_both_detectors_per_seed_and_reuses_finished_runs(tmp_path):
    data = make_tiny_dataset(tmp_path / "digits")
    out = tmp_path / "study"
    opts = tiny_opts(tmp_path / "unused", max_iter=2)
    drop = {"DATASETS.TRAIN", "DATASETS.TEST", "OUTPUT_DIR"}
    opts = [x for k, v in zip(opts[::2], opts[1::2]) if k not in drop for x in (k, v)]
    args = ["--seeds", "0", "1", "--datasets", "tiny", "--output", str(out), "--jobs", "2"]
    for split in ("train", "val"):
        args += ["--register-coco", f"tiny_{split}", *data[split]]
    first = _run_study(args + ["--curve", "--quality-check"] + opts, timeout=400)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    runs = report["datasets"]["tiny"]["runs"]
    assert sorted(runs) == ["gfl", "gfocalv2"] and sorted(runs["gfl"]) == ["0", "1"]
    for key in runs:
        for seed in ("0", "1"):
            config = (out / "tiny" / key / f"seed{seed}" / "config.yaml").read_text()
            assert f"SEED: {seed}" in config
            assert ("DGQP_ENABLED: false" in config) == (key == "gfl")
            assert 0 <= runs[key][seed]["ap"] <= 100
    metrics = report["datasets"]["tiny"]["summary"]["metrics"]
    assert metrics["ap"]["difference"] == pytest.approx(
        np.mean([runs["gfocalv2"][s]["ap"] - runs["gfl"][s]["ap"] for s in ("0", "1")])
    )
    assert "## tiny" in (out / "report.md").read_text()
    # --curve: the checkpoint of iteration 2 (SOLVER.CHECKPOINT_PERIOD 2) is the trained model
    # itself (MAX_ITER 2), evaluated again with --eval-only: the same numbers.
    curve = report["datasets"]["tiny"]["curve"]
    assert list(curve) == ["2"]
    assert curve["2"]["metrics"]["ap"]["difference"] == pytest.approx(metrics["ap"]["difference"])
    assert (out / "tiny" / "gfl" / "seed1" / "eval_iter2" / "inference").is_dir()

    again = _run_study(
        args + ["--curve", "--quality-check"] + opts, timeout=120
    )  # nothing trained again
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "4 of 4 runs already done" in again.stdout and "run, " not in again.stdout
    assert json.loads((out / "report.json").read_text())["datasets"] == report["datasets"]


def test_unknown_dataset_is_named(capsys):
    with pytest.raises(SystemExit) as exc:
        dgqp_study.main(["--datasets", "no_such_data", "--output", "/nonexistent"])
    assert "no_such_data_train" in str(exc.value) and "--register-coco" in str(exc.value)
    with pytest.raises(SystemExit) as exc:
        dgqp_study.main(["--output", "/nonexistent", "OUTPUT_DIR", "x"])
    assert "--output" in str(exc.value)


def test_quality_check_reads_the_dgqp_factor_and_scores_without_it(tmp_path):
    """On a tiny untrained GFocalV2 whose DGQP is made constant (last layer's weights 0, bias b):
    q is sigmoid(b) at every passing location, and leaving it out changes no ranking, so the AP
    is the same; with the DGQP's random weights q spreads."""
    import torch
    from detectron2.modeling import build_model

    import gfocalv2.modeling  # noqa: F401
    from gfocalv2.data.datasets import register_coco_datasets
    from gfocalv2.engine import build_cfg

    data = make_tiny_dataset(tmp_path / "digits")
    register_coco_datasets([("qc_tiny_val", *data["val"])])
    opts = tiny_opts(tmp_path / "run", train_name="qc_tiny_val", test_name="qc_tiny_val")
    cfg = build_cfg(str(REPO / "projects/DigitScenes/configs/gfocalv2_R_18_digits.yaml"), opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    os.makedirs(cfg.OUTPUT_DIR)
    with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    run = {"out": cfg.OUTPUT_DIR}

    with torch.no_grad():
        model.head.dgqp[2].weight.mul_(1e4)  # a spread of q that the checkpoint keeps
    torch.save({"model": model.state_dict()}, os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
    spread = dgqp_study.quality_factor_check(run)["quality_percentiles_5_50_95"]
    assert spread[2] - spread[0] > 1e-3  # (the constant DGQP below: exactly 0)

    os.remove(os.path.join(cfg.OUTPUT_DIR, "quality_check.json"))  # the cache
    with torch.no_grad():
        model.head.dgqp[2].weight.zero_()
        model.head.dgqp[2].bias.fill_(0.4)
    torch.save({"model": model.state_dict()}, os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
    check = dgqp_study.quality_factor_check(run)
    expected = 1 / (1 + np.exp(-0.4))
    assert check["quality_percentiles_5_50_95"] == pytest.approx([expected] * 3, abs=1e-6)
    assert check["num_locations"] > 0
    assert check["ap_classification_only"] == pytest.approx(check["ap"], abs=1e-9)
    assert dgqp_study.quality_factor_check(run) == check  # cached
