"""Faults during training: non-finite loss, interruption + resume (bit-identical), data that
disappears mid-run, crashes while saving checkpoints, and evaluation of a model that
predicts nothing. (The training data order itself: tests/data/test_loader.py.)"""

import math
import os
import re

import pytest
import torch
from PIL import Image

from tests.utils.reliability import (
    TRAINING_ONLY_OPTS,
    VARIED_SIZES,
    capture_logs,
    make_trainer,
    messages,
    tiny_cfg,
    training_cfg,
)

from detectron2.engine import HookBase

from gfocalv2.data import DataLoadingError
from gfocalv2.checkpoint import atomic_torch_save, atomic_write_text
from gfocalv2.engine.trainer import NonFiniteLossError


@pytest.fixture(scope="module")
def dataset(coco_dataset):
    return coco_dataset("rel_train", sizes=VARIED_SIZES).name


class Record(HookBase):
    """Per iteration: the learning rate used and the batch's images."""

    def __init__(self):
        self.lr, self.batches = {}, {}

    def before_step(self):
        self.lr[self.trainer.iter] = self.trainer.optimizer.param_groups[0]["lr"]

    def after_step(self):
        self.batches[self.trainer.iter] = [
            d["image_id"] for d in self.trainer.data_loader.last_batch
        ]


class Killed(BaseException):
    pass


class KillAfter(HookBase):
    def __init__(self, iteration):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            raise Killed()


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _same_weights(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _cfg(out, dataset, max_iter, extra=()):
    return training_cfg(out, dataset, max_iter, extra)


def test_resume_after_interruption_is_bit_identical(dataset, tmp_path):
    max_iter = 8
    full = make_trainer(_cfg(tmp_path / "full", dataset, max_iter))
    rec_full = Record()
    full.register_hooks([rec_full])
    full.train()

    out = tmp_path / "interrupted"
    first = make_trainer(_cfg(out, dataset, max_iter))
    first.register_hooks(
        [KillAfter(4)]
    )  # iteration 4 is done but not checkpointed: lost, as with kill -9
    with pytest.raises(Killed):
        first.train()
    assert (out / "last_checkpoint").read_text() == "model_0000003.pth"

    resumed = make_trainer(_cfg(out, dataset, max_iter), resume=True)
    assert resumed.start_iter == 4
    rec = Record()
    resumed.register_hooks([rec])
    resumed.train()

    assert rec.lr == {
        i: rec_full.lr[i] for i in range(4, max_iter)
    }  # warm-up and step schedule continue
    assert rec.batches == {
        i: rec_full.batches[i] for i in range(4, max_iter)
    }  # same images, same order
    assert _same_weights(
        _weights(out / "model_final.pth")["model"],
        _weights(tmp_path / "full" / "model_final.pth")["model"],
    )
    # the optimizer state (SGD momentum) went through the checkpoint too
    opt_a = _weights(out / "model_final.pth")["trainer"]["_trainer"]["optimizer"]["state"]
    opt_b = _weights(tmp_path / "full" / "model_final.pth")["trainer"]["_trainer"]["optimizer"][
        "state"
    ]
    assert opt_a.keys() == opt_b.keys() and all(
        torch.equal(opt_a[k]["momentum_buffer"], opt_b[k]["momentum_buffer"]) for k in opt_a
    )


def test_non_finite_loss_stops_with_iteration_losses_images_and_last_good_checkpoint(
    dataset, tmp_path
):
    out = tmp_path / "nan"
    trainer = make_trainer(_cfg(out, dataset, 8, extra=["SOLVER.CHECKPOINT_PERIOD", "100"]))
    model = trainer.model
    original_losses = model.losses
    calls = {"n": 0}

    def losses(*args, **kwargs):
        result = original_losses(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:  # iteration 3
            result["loss_giou"] = result["loss_giou"] * float("nan")
        return result

    model.losses = losses
    with pytest.raises(FloatingPointError) as e:
        trainer.train()
    err = e.value
    assert isinstance(err, NonFiniteLossError) and err.iteration == 3
    msg = str(err)
    # Detectron2's own report (_write_metrics), then the batch and where the state is
    assert "Loss became infinite or NaN at iteration=3!" in msg
    assert re.search(r"'loss_giou': (np\.float64\()?nan", msg) and "'loss_qfl': " in msg
    batch = trainer.data_loader.last_batch
    assert len(batch) == 2
    for d in batch:
        assert f"image_id {d['image_id']} ({d['file_name']})" in msg and "img_" in d["file_name"]
    assert f"saved to {out / 'model_0000002.pth'}" in msg and "run again with --resume" in msg
    ckpt = _weights(out / "model_0000002.pth")
    assert ckpt["iteration"] == 2 and (out / "last_checkpoint").read_text() == "model_0000002.pth"
    # the checkpoint is the state before the bad update, which was never applied: the weights
    # (and the optimizer's momentum) of an uninterrupted run after iteration 2. The BatchNorm
    # running statistics also hold the failed iteration's forward pass (finite here: the loss
    # alone was made NaN); nothing copies them at every step to undo that.
    current = {k: v for k, v in model.state_dict().items()}
    assert _same_weights(ckpt["model"], current)
    assert all(torch.isfinite(v).all() for v in current.values() if v.is_floating_point())
    reference = tmp_path / "reference"
    make_trainer(_cfg(reference, dataset, 3, extra=["SOLVER.CHECKPOINT_PERIOD", "3"])).train()
    ref = _weights(reference / "model_final.pth")
    params = {n for n, _ in model.named_parameters()}
    assert len(params) > 10
    assert all(torch.equal(ckpt["model"][n], ref["model"][n]) for n in params)
    momentum = lambda c: c["trainer"]["_trainer"]["optimizer"]["state"]  # noqa: E731
    assert all(
        torch.equal(momentum(ckpt)[k]["momentum_buffer"], momentum(ref)[k]["momentum_buffer"])
        for k in momentum(ref)
    )
    resumed = make_trainer(
        _cfg(out, dataset, 8, extra=["SOLVER.CHECKPOINT_PERIOD", "100"]), resume=True
    )
    assert resumed.start_iter == 3


def test_divergence_stops_without_saving_non_finite_weights(dataset, tmp_path):
    """A real divergence (learning rate 1e6, a checkpoint after every iteration): the losses of
    iterations 0 and 1 are finite, their updates blow the weights up until iteration 2's forward
    pass overflows to NaN boxes and losses. That is a non-finite loss (not an assertion in the
    GIoU loss), and the last checkpoint, whose weights are finite, is named."""
    out = tmp_path / "diverge"
    cfg = _cfg(
        out,
        dataset,
        30,
        extra=[
            "SOLVER.BASE_LR",
            "1e6",
            "SOLVER.WARMUP_ITERS",
            "0",
            "SOLVER.CHECKPOINT_PERIOD",
            "1",
        ],
    )
    with pytest.raises(NonFiniteLossError) as e:
        make_trainer(cfg).train()
    assert e.value.iteration == 2
    msg = str(e.value)
    assert "Loss became infinite or NaN at iteration=2!" in msg and "SOLVER.BASE_LR" in msg
    assert f"The state after iteration 1 is {out / 'model_0000001.pth'}." in msg
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    state = _weights(out / "model_0000001.pth")["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not (out / "model_0000002.pth").exists()  # nothing saved from the failed iteration


def test_images_vanishing_mid_run_stop_with_a_checkpoint(coco_dataset, tmp_path):
    name, _, image_dir, _ = coco_dataset("rel_vanish", sizes=[(64, 64)] * 4)

    class DeleteImages(HookBase):
        def after_step(self):
            if self.trainer.iter == 2:
                for f in os.listdir(image_dir):
                    os.remove(os.path.join(image_dir, f))

    out = tmp_path / "out"
    trainer = make_trainer(
        _cfg(
            out,
            name,
            8,
            extra=["SOLVER.CHECKPOINT_PERIOD", "100", "DATALOADER.MAX_CONSECUTIVE_FAILURES", "3"],
        )
    )
    trainer.register_hooks([DeleteImages()])
    with capture_logs() as logs, pytest.raises(
        DataLoadingError,
        match=r"(?s)4 training images in a row could not be loaded.*img_\d.png does not exist",
    ):
        trainer.train()
    assert "Saved the last good state (after iteration 2)" in messages(logs)
    assert _weights(out / "model_0000002.pth")["iteration"] == 2


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    import gfocalv2.checkpoint as ck

    path = tmp_path / "model_final.pth"
    atomic_torch_save({"v": torch.ones(3)}, path)
    atomic_write_text(tmp_path / "last_checkpoint", "model_final.pth")

    def crash(obj, f):  # writes half a file, then the process "dies"
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"v": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["v"], torch.ones(3))  # the old file, intact

    def crash_text(f):
        f.write("model_00")
        raise OSError("disk full")

    with pytest.raises(OSError):
        ck._atomic_write(str(tmp_path / "last_checkpoint"), crash_text, "w")
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(os.listdir(tmp_path)) == [
        "last_checkpoint",
        "model_final.pth",
    ]  # no temp file left


def test_trainer_checkpoints_go_through_the_atomic_writer(dataset, tmp_path, monkeypatch):
    import gfocalv2.checkpoint as ck

    written = []
    real = ck._atomic_write
    monkeypatch.setattr(
        ck,
        "_atomic_write",
        lambda path, write, mode: (written.append(os.path.basename(path)), real(path, write, mode)),
    )
    make_trainer(_cfg(tmp_path, dataset, 2, extra=["SOLVER.CHECKPOINT_PERIOD", "1"])).train()
    assert written == [
        "model_0000000.pth",
        "last_checkpoint",
        "model_0000001.pth",
        "last_checkpoint",
        "model_final.pth",
        "last_checkpoint",
    ]


def test_resume_falls_back_when_the_last_checkpoint_is_truncated(dataset, tmp_path):
    out = tmp_path / "run"
    make_trainer(_cfg(out, dataset, 4, extra=["SOLVER.CHECKPOINT_PERIOD", "2"])).train()
    final = out / "model_final.pth"
    final.write_bytes(final.read_bytes()[:2000])  # as a crash of a non-atomic writer would leave it
    with capture_logs() as logs:
        resumed = make_trainer(
            _cfg(out, dataset, 6, extra=["SOLVER.CHECKPOINT_PERIOD", "2"]), resume=True
        )
    assert resumed.start_iter == 4  # from model_0000003.pth
    text = messages(logs)
    assert "model_final.pth" in text and "resumed from" in text and "model_0000003.pth" in text


def test_evaluating_a_model_that_predicts_nothing_gives_zeros(coco_dataset, tmp_path):
    from gfocalv2.engine import Trainer

    name = coco_dataset("rel_eval_nothing", sizes=[(64, 64)] * 3).name
    cfg = tiny_cfg(tmp_path / "out", name, name, extra=["MODEL.GFOCAL.SCORE_THRESH_TEST", "1.0"])
    model = Trainer.build_model(cfg)
    with capture_logs() as logs:
        results = Trainer.test(cfg, model)
    bbox = results["bbox"]
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "AP-a", "AP-b", "AP-c"} <= set(bbox)
    assert all(v == 0.0 for v in bbox.values()), bbox
    assert "predicted no box on rel_eval_nothing (3 images)" in messages(logs)
    # with predictions, the numbers are Detectron2's COCOEvaluator's own, untouched (NaN where
    # undefined): the same as the evaluator alone on the same model and data
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset

    from gfocalv2.modeling.inference_optimization import optimized_copy

    cfg = tiny_cfg(tmp_path / "out2", name, name, extra=["MODEL.GFOCAL.SCORE_THRESH_TEST", "0.0"])
    model = Trainer.build_model(cfg)
    with capture_logs() as logs:
        ours = Trainer.test(cfg, model)["bbox"]
    assert "predicted no box" not in messages(logs)
    evaluator = COCOEvaluator(name, tasks=("bbox",), output_dir=str(tmp_path / "bare"))
    loader = Trainer.build_test_loader(cfg, name)
    bare = inference_on_dataset(optimized_copy(model, cfg), loader, evaluator)["bbox"]
    assert set(ours) == set(bare) and len(ours) >= 9
    same = lambda a, b: a == b or (math.isnan(a) and math.isnan(b))  # noqa: E731
    assert all(same(ours[k], bare[k]) for k in ours), (ours, bare)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # three runs of at most 300 s
def test_killed_process_resumes_bit_identical_through_train_net(dataset, tmp_path):
    """train_net.py in a subprocess, SIGKILLed after iteration 4, resumed with --resume."""
    import signal
    import subprocess
    import sys

    from detectron2.data import MetadataCatalog

    from tests.utils.reliability import small_opts
    from tests.utils.workflow import DIGITS_CONFIG, REPO, env_with_repo_on_pythonpath

    meta = MetadataCatalog.get(dataset)

    def argv(out, extra=()):
        return [
            "--config-file",
            str(DIGITS_CONFIG),
            *extra,
            "--register-coco",
            "rel_kill",
            meta.json_file,
            meta.image_root,
            *small_opts(out, "rel_kill", "rel_kill", max_iter=8),
            *TRAINING_ONLY_OPTS,
        ]

    runner = (
        "import sys, os, signal\n"
        "import train_net\n"
        "from detectron2.engine import HookBase\n"
        "from gfocalv2.engine import Trainer\n"
        "class Kill(HookBase):\n"
        "    def after_step(self):\n"
        "        if self.trainer.iter == int(os.environ.get('KILL_AT', '-1')):\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "orig = Trainer.build_hooks\n"
        "Trainer.build_hooks = lambda self: orig(self) + [Kill()]\n"
        "sys.argv = ['train_net.py'] + sys.argv[1:]\n"
        "train_net.invoke_main()\n"
    )
    script = tmp_path / "run.py"
    script.write_text(runner)
    env = dict(
        env_with_repo_on_pythonpath(), OMP_NUM_THREADS="1"
    )  # the script in tmp_path imports train_net

    def run(out, kill_at=-1, extra=()):
        return subprocess.run(
            [sys.executable, str(script), *[str(a) for a in argv(out, extra)]],
            env=dict(env, KILL_AT=str(kill_at)),
            cwd=str(REPO),
            capture_output=True,
            text=True,
            timeout=300,
        )

    full = run(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run(tmp_path / "killed", kill_at=4)
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "killed" / "last_checkpoint").read_text() == "model_0000003.pth"
    resumed = run(tmp_path / "killed", extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Starting training from iteration 4" in resumed.stderr + resumed.stdout
    assert _same_weights(
        _weights(tmp_path / "killed" / "model_final.pth")["model"],
        _weights(tmp_path / "full" / "model_final.pth")["model"],
    )


def test_test_sets_are_checked_when_the_trainer_is_built(dataset, coco_dataset, tmp_path):
    from gfocalv2.data import DatasetError
    from gfocalv2.engine import Trainer

    val, _, image_dir, _ = coco_dataset("rel_val_missing", sizes=[(64, 64)] * 3)
    os.remove(os.path.join(image_dir, "img_2.png"))
    cfg = tiny_cfg(tmp_path / "out", dataset, val)
    with pytest.raises(
        DatasetError,
        match=r"'rel_val_missing'.*used for evaluation: 1 of 3 images do not exist: .*img_2.png",
    ):
        Trainer(cfg)


def test_a_failing_evaluation_during_training_saves_the_finished_iteration(
    dataset, coco_dataset, tmp_path
):
    val, _, image_dir, _ = coco_dataset("rel_val_vanish", sizes=[(64, 64)] * 2)

    class DeleteValImage(HookBase):
        def after_step(self):
            if self.trainer.iter == 1:
                os.remove(os.path.join(image_dir, "img_1.png"))

    out = tmp_path / "out"
    cfg = tiny_cfg(
        out,
        dataset,
        val,
        max_iter=6,
        extra=["TEST.EVAL_PERIOD", "3", "SOLVER.CHECKPOINT_PERIOD", "100"],
    )
    trainer = make_trainer(cfg)
    trainer.register_hooks([DeleteValImage()])
    with pytest.raises(Exception, match="img_1.png"):
        trainer.train()
    ckpt = _weights(out / "model_0000002.pth")
    assert ckpt["iteration"] == 2 and (out / "last_checkpoint").read_text() == "model_0000002.pth"
    with pytest.raises(Exception, match="img_1.png"):  # still missing: refused at start-up
        make_trainer(cfg, resume=True)
    Image.new("RGB", (64, 64)).save(os.path.join(image_dir, "img_1.png"))  # restored
    assert make_trainer(cfg, resume=True).start_iter == 3


def test_resume_from_a_checkpoint_without_optimizer_state(dataset, tmp_path):
    """Written by Detectron2 0.6's own DefaultTrainer (no "_trainer"): resumes, with a warning, on
    every Detectron2 version (later ones read "_trainer" unconditionally)."""
    out = tmp_path / "run"
    make_trainer(_cfg(out, dataset, 2, extra=["SOLVER.CHECKPOINT_PERIOD", "100"])).train()
    ckpt = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    del ckpt["trainer"]["_trainer"]
    torch.save(ckpt, out / "model_final.pth")
    with capture_logs() as logs:
        resumed = make_trainer(
            _cfg(out, dataset, 4, extra=["SOLVER.CHECKPOINT_PERIOD", "100"]), resume=True
        )
    assert resumed.start_iter == 2
    assert "no optimizer state" in messages(logs)
    resumed.train()


def test_data_seed_of_a_random_seed_run_restores_the_augmentation_seed(dataset, tmp_path):
    """SEED -1: the resumed run uses the saved data seed for the sampler and for the
    augmentations."""
    from gfocalv2.engine.trainer import DataSeedHook

    trainer = make_trainer(_cfg(tmp_path / "run", dataset, 2, extra=["SEED", "-1"]))
    hook = next(h for h in trainer._hooks if isinstance(h, DataSeedHook))
    saved = hook.state_dict()["data_seed"]
    loader = trainer.data_loader
    assert saved == loader.batch_sampler.seed == loader.dataset.seed  # what the loader uses
    first = next(iter(loader.batch_sampler))
    hook.load_state_dict({"data_seed": saved + 7})
    assert loader.batch_sampler.seed == loader.dataset.seed == saved + 7
    assert next(iter(loader.batch_sampler)) != first  # another order: the new seed is used
    hook.load_state_dict({"data_seed": saved})
    assert next(iter(loader.batch_sampler)) == first


def test_sigterm_in_one_process_saves_the_step_and_resume_is_bit_identical(dataset, tmp_path):
    import signal

    from gfocalv2.engine.trainer import TrainingInterrupted

    class SignalAt(HookBase):
        def before_step(self):
            if self.trainer.iter == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives during iteration 1

    full = make_trainer(
        _cfg(tmp_path / "full", dataset, 4, extra=["SOLVER.CHECKPOINT_PERIOD", "100"])
    )
    full.train()
    out = tmp_path / "run"
    trainer = make_trainer(_cfg(out, dataset, 4, extra=["SOLVER.CHECKPOINT_PERIOD", "100"]))
    trainer.register_hooks([SignalAt()])
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as e:
        trainer.train()
    assert e.value.code == 128 + signal.SIGTERM and "after iteration 1 on SIGTERM" in str(e.value)
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    assert (
        _weights(out / "model_0000001.pth")["iteration"] == 1
        and not (out / "model_final.pth").exists()
    )
    resumed = make_trainer(
        _cfg(out, dataset, 4, extra=["SOLVER.CHECKPOINT_PERIOD", "100"]), resume=True
    )
    assert resumed.start_iter == 2
    resumed.train()
    assert _same_weights(
        _weights(out / "model_final.pth")["model"],
        _weights(tmp_path / "full" / "model_final.pth")["model"],
    )
