"""train_net.py end to end on CPU: a few iterations + COCO evaluation, --eval-only, --resume,
and datasets registered from the command line / config without code."""

import json
import os
import shutil

import pytest
import torch

from tests.utils.workflow import DIGITS_CONFIG, tiny_opts

import train_net  # the repository root is on the import path (pytest.ini)
from gfocalv2.engine import build_cfg, register_coco_datasets, workflow_argument_parser


def _run(argv):
    args = workflow_argument_parser().parse_args([str(a) for a in argv])
    return train_net.main(args)


def _register_args(data, prefix="cli_digits"):
    (tj, ti), (vj, vi) = data["train"], data["val"]
    return [
        "--register-coco",
        f"{prefix}_train",
        tj,
        ti,
        "--register-coco",
        f"{prefix}_val",
        vj,
        vi,
    ]


def _metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _last_eval(output_dir):
    """The evaluation logged after the last iteration (Detectron2 logs it at iteration max_iter)."""
    return [row for row in _metrics(output_dir) if "bbox/AP" in row][-1]


def _detections(output_dir):
    with open(os.path.join(output_dir, "inference", "coco_instances_results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def trained(tiny_digits, tmp_path_factory):
    """4 iterations (checkpoints at iterations 2 and 4) + evaluation, through train_net.main."""
    root = tmp_path_factory.mktemp("workflow")
    data = tiny_digits
    out = root / "train"
    argv = (
        ["--config-file", DIGITS_CONFIG]
        + _register_args(data)
        + tiny_opts(out, "cli_digits_train", "cli_digits_val", max_iter=4)
    )
    _run(argv)
    return {"root": root, "data": data, "out": out}


def test_train_writes_checkpoints_metrics_and_evaluation(trained):
    out = trained["out"]
    for name in (
        "model_0000001.pth",
        "model_final.pth",
        "last_checkpoint",
        "metrics.json",
        "config.yaml",
        "log.txt",
    ):
        assert (out / name).exists(), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out)), (
        "no TensorBoard events"
    )
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    ckpt = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 3
    train_rows = [row for row in _metrics(out) if "total_loss" in row]
    assert train_rows[-1]["iteration"] == 3
    for key in ("loss_qfl", "loss_giou", "loss_dfl"):
        assert torch.isfinite(torch.tensor(train_rows[-1][key])), key
    evaluation = _last_eval(out)
    assert {"bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/AP-0"} <= set(evaluation)
    dets = _detections(out)
    assert len(dets) > 0 and {"image_id", "category_id", "bbox", "score"} <= set(dets[0])
    # the registration came from the command line and is recorded in the dumped config
    dumped = (out / "config.yaml").read_text()
    assert "cli_digits_train" in dumped and "REGISTER_COCO" in dumped


def test_eval_only_reproduces_the_checkpoint_exactly(trained):
    out, data = trained["out"], trained["data"]
    eval_out = trained["root"] / "eval_only"
    argv = (
        ["--config-file", DIGITS_CONFIG, "--eval-only"]
        + _register_args(data)
        + tiny_opts(eval_out, "cli_digits_train", "cli_digits_val")
        + ["MODEL.WEIGHTS", out / "model_final.pth"]
    )
    results = _run(argv)
    # identical detections (boxes and scores, bit for bit) and identical AP
    assert _detections(eval_out) == _detections(out)
    logged = _last_eval(out)
    for key, value in results["bbox"].items():
        logged_value = logged[f"bbox/{key}"]
        if value != value:  # NaN (a category absent from the tiny val set)
            assert logged_value != logged_value
        else:
            assert value == logged_value, key


def _tta_detections(output_dir):
    with open(os.path.join(output_dir, "inference_TTA", "coco_instances_results.json")) as f:
        return json.load(f)


def test_eval_only_with_test_time_augmentation(trained):
    """``--eval-only ... TEST.AUG.ENABLED True`` reports both evaluations, as Detectron2's
    train_net ("bbox" and "bbox_TTA"). With the one view of the test size (64) and no flip the
    TTA detections are the plain ones exactly; with two scales and the flip they differ and
    are evaluated too."""
    out, data = trained["out"], trained["data"]

    def evaluate(output_dir, *aug):
        return _run(
            ["--config-file", DIGITS_CONFIG, "--eval-only"]
            + _register_args(data)
            + tiny_opts(output_dir, "cli_digits_train", "cli_digits_val")
            + ["MODEL.WEIGHTS", out / "model_final.pth", "TEST.AUG.ENABLED", "True", *aug]
        )

    one_view = trained["root"] / "tta_one_view"
    results = evaluate(
        one_view, "TEST.AUG.MIN_SIZES", "(64,)", "TEST.AUG.MAX_SIZE", "64", "TEST.AUG.FLIP", "False"
    )
    assert set(results) == {"bbox", "bbox_TTA"}
    assert len(_detections(one_view)) > 0
    assert _tta_detections(one_view) == _detections(one_view) == _detections(out)
    for key, value in results["bbox"].items():
        tta_value = results["bbox_TTA"][key]
        assert value == tta_value or (value != value and tta_value != tta_value), key

    views = trained["root"] / "tta_views"
    results = evaluate(views, "TEST.AUG.MIN_SIZES", "(64, 96)", "TEST.AUG.MAX_SIZE", "96")
    assert set(results) == {"bbox", "bbox_TTA"}
    plain, tta = _detections(views), _tta_detections(views)
    assert len(tta) > 0 and tta != plain
    assert 0.0 <= results["bbox_TTA"]["AP"] <= 100.0


def test_training_ends_with_the_tta_evaluation_when_enabled(tiny_digits, tmp_path):
    """With TEST.AUG.ENABLED the evaluation after the last iteration also runs with TTA and its
    results are logged (``bbox_TTA/AP`` in metrics.json), as Detectron2's train_net."""
    out = tmp_path / "train_tta"
    argv = (
        ["--config-file", DIGITS_CONFIG]
        + _register_args(tiny_digits, "tta_digits")
        + tiny_opts(out, "tta_digits_train", "tta_digits_val", max_iter=2)
        + ["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(64, 80)", "TEST.AUG.MAX_SIZE", "80"]
    )
    _run(argv)
    rows = [row for row in _metrics(out) if "bbox_TTA/AP" in row]
    assert len(rows) == 1 and rows[0]["iteration"] == 2  # logged at max_iter, as the plain one
    assert "bbox/AP" in rows[0]
    assert any("bbox/AP" in row for row in _metrics(out))
    assert len(_tta_detections(out)) > 0


def test_resume_continues_at_the_next_iteration(trained):
    out, data = trained["out"], trained["data"]
    resumed = trained["root"] / "resumed"
    shutil.copytree(out, resumed)
    argv = (
        ["--config-file", DIGITS_CONFIG, "--resume"]
        + _register_args(data)
        + tiny_opts(resumed, "cli_digits_train", "cli_digits_val", max_iter=6)
    )
    _run(argv)
    ckpt = torch.load(resumed / "model_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 5
    log = (resumed / "log.txt").read_text()
    assert "Starting training from iteration 4" in log
    # the copied run's rows, then the resumed run's: it did not start over at iteration 0
    with open(resumed / "metrics.json") as f:
        iters = [json.loads(line)["iteration"] for line in f if line.strip()]
    assert iters == sorted(iters) and iters[-1] == 6 and 5 in iters


def test_register_coco_from_config_key(trained, tmp_path):
    (tj, ti), (vj, vi) = trained["data"]["train"], trained["data"]["val"]
    cfg = build_cfg(
        str(DIGITS_CONFIG),
        [
            "DATASETS.REGISTER_COCO",
            str([["cfg_digits_train", tj, ti], ["cfg_digits_val", vj, vi]]),
            "MODEL.DEVICE",
            "cpu",
        ],
    )
    from detectron2.data import DatasetCatalog

    dicts = DatasetCatalog.get("cfg_digits_train")
    assert len(dicts) == 8 and all(d["annotations"] for d in dicts)
    assert [tuple(e) for e in cfg.DATASETS.REGISTER_COCO][0][0] == "cfg_digits_train"
    # same name, same files: no-op; same name, other files: clear error
    register_coco_datasets([("cfg_digits_train", tj, ti)])
    with pytest.raises(ValueError, match="already registered"):
        register_coco_datasets([("cfg_digits_train", vj, vi)])


def test_register_coco_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        register_coco_datasets([("x_train", str(tmp_path / "nope.json"), str(tmp_path))])
    with pytest.raises(ValueError, match="NAME, JSON_FILE, IMAGE_DIR"):
        register_coco_datasets([("x_train", "only-two")])


def test_unregistered_dataset_and_class_count_errors(trained, tmp_path):
    from gfocalv2.engine import Trainer

    cfg = build_cfg(str(DIGITS_CONFIG), tiny_opts(tmp_path, "no_such_dataset", "no_such_dataset"))
    with pytest.raises(KeyError, match="no_such_dataset.*--register-coco"):
        Trainer.build_train_loader(cfg)
    cfg = build_cfg(
        str(DIGITS_CONFIG),
        tiny_opts(tmp_path, "cli_digits_train", "cli_digits_val")
        + ["MODEL.GFOCAL.NUM_CLASSES", "3"],
    )
    with pytest.raises(ValueError, match="MODEL.GFOCAL.NUM_CLASSES 10"):
        Trainer.build_train_loader(cfg)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        build_cfg(str(tmp_path / "missing.yaml"))


def test_no_host_synchronization_beyond_detectron2s_own(tiny_digits, tmp_path):
    """Per training iteration, the calls that wait for the device on a GPU (item, tolist, cpu,
    numpy, bool, float, int) are at most those of Detectron2's DefaultTrainer on the same model
    and data: the project adds hooks without a synchronization, and no copies of the
    normalization statistics."""
    from tests.utils.host_sync import Detectron2Trainer, count_per_iteration

    from gfocalv2.engine import Trainer

    register_coco_datasets(
        [
            ["sync_train", *map(str, tiny_digits["train"])],
            ["sync_val", *map(str, tiny_digits["val"])],
        ]
    )
    counts = {}
    for name, trainer_class in (("gfocalv2", Trainer), ("detectron2", Detectron2Trainer)):
        opts = tiny_opts(tmp_path / name, "sync_train", "sync_val", max_iter=7)
        # mapping in a worker process: its calls are not the training step's
        opts += ["DATALOADER.NUM_WORKERS", "1", "SOLVER.CHECKPOINT_PERIOD", "100", "SEED", "3"]
        counts[name], _ = count_per_iteration(trainer_class, build_cfg(DIGITS_CONFIG, opts), 1, 5)
    ours, theirs = counts["gfocalv2"], counts["detectron2"]
    assert sum(theirs.values()) >= 2  # the counting sees Detectron2's own (metrics: .item())
    assert all(ours[k] <= theirs[k] for k in ours), (ours, theirs)
