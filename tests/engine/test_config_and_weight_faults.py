"""Bad configs and weights: errors that name the key / file / value and say what to do."""

import pytest
import torch

from tests.utils.models import gfocal_cfg
from tests.utils.reliability import (
    DIGITS_CONFIG,
    capture_logs,
    messages,
    small_opts,
    tiny_cfg,
    write_coco,
)

from detectron2.modeling import build_model

from gfocalv2 import add_gfocalv2_config
from gfocalv2.engine import build_cfg
from gfocalv2.checkpoint import CheckpointError, UnreadableCheckpointError, checkpointer_for
from gfocalv2.config_checks import (
    ConfigValueError,
    UnknownConfigKeyError,
    merge_config_list,
)


# ------------------------------------------------------------------ config keys
def test_unknown_key_in_a_file_names_file_key_and_close_match(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(f"_BASE_: {DIGITS_CONFIG}\nSOLVER:\n  MAX_ITERS: 3\n")
    with pytest.raises(KeyError) as e:  # still a KeyError, as Detectron2's
        build_cfg(str(path))
    assert isinstance(e.value, UnknownConfigKeyError)
    msg = str(e.value)
    assert (
        str(path) in msg
        and "unknown config key SOLVER.MAX_ITERS" in msg
        and "Did you mean SOLVER.MAX_ITER" in msg
    )


@pytest.mark.parametrize(
    "key, suggestion",
    [
        ("MODEL.GFOCAL.NUM_CLASS", "MODEL.GFOCAL.NUM_CLASSES"),
        ("MODEL.NUM_CLASSES", "MODEL.GFOCAL.NUM_CLASSES"),
        ("SOLVER.BASE_LRR", "SOLVER.BASE_LR"),
    ],
)
def test_unknown_key_on_the_command_line(key, suggestion):
    with pytest.raises(UnknownConfigKeyError) as e:
        build_cfg(str(DIGITS_CONFIG), [key, "3"])
    msg = str(e.value)
    assert f"command-line override {key} 3: unknown config key {key}" in msg and suggestion in msg


def test_wrong_types_name_key_expected_type_and_value(tmp_path):
    with pytest.raises(ValueError) as e:
        build_cfg(str(DIGITS_CONFIG), ["SOLVER.MAX_ITER", "abc"])
    assert isinstance(e.value, ConfigValueError)
    assert "SOLVER.MAX_ITER must be of type int" in str(e.value) and "got abc of type str" in str(
        e.value
    )
    with pytest.raises(
        ConfigValueError,
        match=r"SOLVER.BASE_LR must be of type float .*got 1 of type int.*e.g. 1.0",
    ):
        build_cfg(str(DIGITS_CONFIG), ["SOLVER.BASE_LR", "1"])
    path = tmp_path / "bad_type.yaml"
    path.write_text(f"_BASE_: {DIGITS_CONFIG}\nSOLVER:\n  STEPS: 5\n")
    with pytest.raises(
        ConfigValueError,
        match=rf"{path}: config key SOLVER.STEPS must be of type tuple.*Write a list",
    ):
        build_cfg(str(path))
    with pytest.raises(ConfigValueError, match="must be KEY VALUE pairs"):
        merge_config_list(build_cfg(freeze=False), ["SOLVER.MAX_ITER"])


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        build_cfg(str(tmp_path / "missing.yaml"))
    path = tmp_path / "child.yaml"
    path.write_text("_BASE_: no_such_base.yaml\n")
    with pytest.raises(
        FileNotFoundError,
        match=rf"{path} \(or one of its _BASE_ files\) refers to .*no_such_base.yaml",
    ):
        build_cfg(str(path))
    path.write_text("SOLVER:\n  MAX_ITER: [3\n")
    with pytest.raises(
        ConfigValueError, match=rf"(?s)config file {path} is not valid YAML.*line 2"
    ):
        build_cfg(str(path))


def test_reliability_keys_exist_and_are_idempotent():
    cfg = build_cfg(str(DIGITS_CONFIG))
    assert cfg.MODEL.REINIT_HEAD_ON_CLASS_MISMATCH is False
    assert cfg.DATALOADER.MAX_CONSECUTIVE_FAILURES == 10 and cfg.DATASETS.CHECK_IMAGES == "exists"
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATALOADER.MAX_CONSECUTIVE_FAILURES = 3
    add_gfocalv2_config(cfg)
    assert cfg.DATALOADER.MAX_CONSECUTIVE_FAILURES == 3


# ------------------------------------------------------------------ NUM_CLASSES vs the dataset
def test_num_classes_must_cover_the_dataset(coco_dataset, tmp_path):
    from gfocalv2.engine import Trainer

    name = coco_dataset("rel_cfg_classes", sizes=[(64, 64)] * 2).name
    with pytest.raises(
        ValueError,
        match=r"'rel_cfg_classes' has 3 classes but MODEL.GFOCAL.NUM_CLASSES is 2; "
        r"set MODEL.GFOCAL.NUM_CLASSES 3",
    ):
        Trainer.build_train_loader(tiny_cfg(tmp_path / "o", name, name, num_classes=2))
    with capture_logs() as logs:
        Trainer.build_train_loader(tiny_cfg(tmp_path / "o", name, name, num_classes=5))
    assert "has 3 classes but MODEL.GFOCAL.NUM_CLASSES is 5" in messages(logs)


# ------------------------------------------------------------------ MODEL.WEIGHTS
def _tiny_model(num_classes=3, **kw):
    cfg = gfocal_cfg("MODEL.GFOCAL.NUM_CLASSES", num_classes, tiny=True)
    add_gfocalv2_config(cfg)
    for k, v in kw.items():
        cfg.merge_from_list([k, v])
    return cfg, build_model(cfg)


def test_missing_weights_file_is_named(tmp_path):
    cfg, model = _tiny_model()
    with pytest.raises(FileNotFoundError, match=r"MODEL.WEIGHTS .*nowhere.pth does not exist"):
        checkpointer_for(cfg, model).load(str(tmp_path / "nowhere.pth"))


def test_missing_weights_through_the_trainer_and_predictor(coco_dataset, tmp_path):
    from gfocalv2.engine import Trainer
    from gfocalv2.engine.predictor import Predictor

    name = coco_dataset("rel_cfg_weights", sizes=[(64, 64)] * 2).name
    cfg = tiny_cfg(tmp_path / "o", name, name, extra=["MODEL.WEIGHTS", str(tmp_path / "gone.pth")])
    trainer = Trainer(cfg)
    with pytest.raises(FileNotFoundError, match="gone.pth does not exist"):
        trainer.resume_or_load(resume=False)
    with pytest.raises(FileNotFoundError, match="gone.pth does not exist"):
        Predictor(cfg)


def test_truncated_weights_file_is_named(tmp_path):
    cfg, model = _tiny_model()
    path = tmp_path / "w.pth"
    torch.save({"model": model.state_dict()}, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(
        UnreadableCheckpointError, match=r"Cannot read checkpoint .*w.pth .*truncated"
    ):
        checkpointer_for(cfg, model).load(str(path))


def _main_branch_load_contract(monkeypatch):
    """Make DetectionCheckpointer.load behave as on Detectron2 main (after v0.6), whatever is
    installed: it records the path in _parsed_url_during_load, asserts that is None when a load
    starts, and resets it only when the load succeeds."""
    from detectron2.checkpoint import DetectionCheckpointer

    if hasattr(DetectionCheckpointer(torch.nn.Linear(1, 1)), "_parsed_url_during_load"):
        return  # the installed Detectron2 has this contract already
    real_load = DetectionCheckpointer.load

    def load(self, path, *args, **kwargs):
        assert getattr(self, "_parsed_url_during_load", None) is None
        self._parsed_url_during_load = path
        ret = real_load(self, path, *args, **kwargs)
        self._parsed_url_during_load = None
        return ret

    monkeypatch.setattr(DetectionCheckpointer, "load", load)


@pytest.mark.parametrize("contract", ["installed", "main"])
def test_checkpointer_loads_again_after_an_unreadable_file(tmp_path, monkeypatch, contract):
    if contract == "main":
        _main_branch_load_contract(monkeypatch)
    cfg, model = _tiny_model()
    good, bad = tmp_path / "good.pth", tmp_path / "bad.pth"
    torch.save({"model": model.state_dict(), "iteration": 7}, good)
    bad.write_bytes(good.read_bytes()[:1000])
    checkpointer = checkpointer_for(cfg, model)
    with pytest.raises(UnreadableCheckpointError):
        checkpointer.load(str(bad))
    assert checkpointer.load(str(good))["iteration"] == 7
    assert getattr(checkpointer, "_parsed_url_during_load", None) is None


@pytest.mark.parametrize("contract", ["installed", "main"])
def test_resume_skips_an_unreadable_last_checkpoint(tmp_path, monkeypatch, contract):
    """--resume: last_checkpoint names a truncated file -> the newest readable model_*.pth is
    used."""
    if contract == "main":
        _main_branch_load_contract(monkeypatch)
    cfg, model = _tiny_model()
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": model.state_dict(), "iteration": 3}, out / "model_0000003.pth")
    final = out / "model_final.pth"
    torch.save({"model": model.state_dict(), "iteration": 5}, final)
    final.write_bytes(final.read_bytes()[:1000])
    (out / "last_checkpoint").write_text("model_final.pth")
    with capture_logs() as logs:
        ret = checkpointer_for(cfg, model, str(out)).resume_or_load("", resume=True)
    assert ret["iteration"] == 3
    assert "resumed from" in messages(logs) and "model_0000003.pth" in messages(logs)


def test_other_class_count_is_refused_unless_reinit_is_asked(tmp_path):
    _, model3 = _tiny_model(3)
    path = tmp_path / "three_classes.pth"
    torch.save({"model": model3.state_dict()}, path)
    cfg5, model5 = _tiny_model(5)
    with pytest.raises(CheckpointError) as e:
        checkpointer_for(cfg5, model5).load(str(path))
    msg = str(e.value)
    assert (
        "head.cls_score.weight: (3, 64, 3, 3) in the checkpoint, (5, 64, 3, 3) in the model" in msg
    )
    assert "MODEL.REINIT_HEAD_ON_CLASS_MISMATCH True" in msg

    cfg5, model5 = _tiny_model(5, **{"MODEL.REINIT_HEAD_ON_CLASS_MISMATCH": True})
    init_cls = model5.head.cls_score.weight.detach().clone()
    with capture_logs("gfocalv2", "fvcore") as logs:
        checkpointer_for(cfg5, model5).load(str(path))
    text = messages(logs)
    assert "re-initializing the classification layer" in text
    assert "Skip loading parameter 'head.cls_score.weight'" in text  # Detectron2's own report
    assert torch.equal(model5.head.cls_score.weight, init_cls)  # kept its initialization
    ref = model3.state_dict()
    for k, v in model5.state_dict().items():
        if "cls_score" not in k and k in ref and ref[k].shape == v.shape:
            assert torch.equal(v, ref[k]), k  # everything else loaded


def test_other_architecture_unmatched_keys_reported_and_nothing_shared_refused(tmp_path):
    cfg, model = _tiny_model()
    state = model.state_dict()
    partial = {k: v for k, v in state.items() if k.startswith("backbone.")}
    partial["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(4, 4)
    path = tmp_path / "partial.pth"
    torch.save({"model": partial}, path)
    with capture_logs("fvcore") as logs:
        checkpointer_for(cfg, model).load(str(path))
    text = messages(logs)
    assert (
        "Some model parameters or buffers are not found in the checkpoint" in text
        and "head.cls_score" in text
    )
    assert "not used by the model" in text and "roi_heads.box_predictor" in text

    path = tmp_path / "unrelated.pth"
    torch.save({"conv1.weight": torch.zeros(3), "fc.bias": torch.zeros(2)}, path)
    with pytest.raises(
        CheckpointError, match="shares no parameter name with the model .*another architecture"
    ):
        checkpointer_for(cfg, model).load(str(path))


def test_eval_only_with_missing_weights_through_train_net(tmp_path):
    import train_net
    from gfocalv2.engine import workflow_argument_parser

    json_path, image_dir, _ = write_coco(tmp_path, sizes=[(64, 64)] * 2)
    argv = [
        "--config-file",
        str(DIGITS_CONFIG),
        "--eval-only",
        "--register-coco",
        "rel_eo",
        json_path,
        image_dir,
    ]
    argv += small_opts(tmp_path / "o", "rel_eo", "rel_eo") + [
        "MODEL.WEIGHTS",
        str(tmp_path / "absent.pth"),
    ]
    with pytest.raises(FileNotFoundError, match="absent.pth does not exist"):
        train_net.main(workflow_argument_parser().parse_args([str(a) for a in argv]))


def test_weights_path_with_a_query_is_not_reported_missing(tmp_path):
    """Detectron2 after v0.6 accepts MODEL.WEIGHTS x.pth?matching_heuristics=True."""
    from detectron2.checkpoint import DetectionCheckpointer

    cfg, model = _tiny_model()
    path = tmp_path / "w.pth"
    torch.save({"model": model.state_dict()}, path)
    checkpointer = checkpointer_for(cfg, model)
    if not hasattr(DetectionCheckpointer(torch.nn.Linear(1, 1)), "_parsed_url_during_load"):
        # v0.6 takes the path as it is: no such file
        with pytest.raises(FileNotFoundError, match="matching_heuristics=True does not exist"):
            checkpointer.load(f"{path}?matching_heuristics=True")
        return
    checkpointer.load(f"{path}?matching_heuristics=True")
    with pytest.raises(
        FileNotFoundError, match=r"nowhere.pth\?matching_heuristics=True does not exist"
    ):
        checkpointer.load(f"{tmp_path / 'nowhere.pth'}?matching_heuristics=True")
