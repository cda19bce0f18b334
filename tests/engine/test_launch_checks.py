"""What --num-gpus N refuses before any process starts, with a message and exit status 2."""

import subprocess
import sys

import pytest
import torch

from tests.utils.models import REPO, gfocal_cfg

from gfocalv2.engine.distributed import LaunchError, check_launch, create_ddp_model


def test_num_gpus_below_one():
    with pytest.raises(
        LaunchError, match=r"--num-gpus 0: give the number of processes per machine, at least 1"
    ):
        check_launch(gfocal_cfg(), 0)


def test_more_processes_than_cuda_devices(monkeypatch):
    cfg = gfocal_cfg()
    cfg.MODEL.DEVICE = "cuda"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(
        LaunchError,
        match=r"--num-gpus 4, but this machine has 2 CUDA device\(s\).*MODEL.DEVICE cpu",
    ):
        check_launch(cfg, 4)
    check_launch(cfg, 2)  # one per GPU is fine (frozen BN in the base config)


@pytest.mark.parametrize("processes, machines", [(3, 1), (2, 3)])
def test_batch_that_the_processes_cannot_share(processes, machines):
    cfg = gfocal_cfg("SOLVER.IMS_PER_BATCH", 16)
    with pytest.raises(
        LaunchError,
        match=rf"SOLVER.IMS_PER_BATCH 16 cannot be split evenly over {processes * machines} "
        r"processes.*divides 16 \(1, 2, 4, 8, 16\)",
    ):
        check_launch(cfg, processes, machines)
    check_launch(cfg, 4, 2)


def test_trained_batch_norm_needs_synchronized_statistics(monkeypatch):
    cfg = gfocal_cfg("MODEL.RESNETS.NORM", "BN", "SOLVER.IMS_PER_BATCH", 4)
    check_launch(cfg, 1)  # one process: nothing to keep equal
    with pytest.raises(
        LaunchError, match=r"\(MODEL.RESNETS.NORM\).*MODEL.RESNETS.NORM naiveSyncBN"
    ):
        check_launch(cfg, 2)
    cfg.MODEL.DEVICE = "cuda"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(LaunchError, match=r"MODEL.RESNETS.NORM SyncBN"):
        check_launch(cfg, 2)
    check_launch(cfg, 2, training=False)  # evaluation does not update the statistics
    for norm in ("naiveSyncBN", "FrozenBN", "BNEval", "GN"):
        check_launch(gfocal_cfg("MODEL.RESNETS.NORM", norm, "SOLVER.IMS_PER_BATCH", 4), 2)


def test_ddp_wrapper_with_one_process_is_the_model_itself():
    model = torch.nn.Linear(2, 2)
    assert create_ddp_model(model, broadcast_buffers=False) is model


@pytest.mark.parametrize(
    "num_gpus, opts, message",
    [
        (
            "3",
            ["SOLVER.IMS_PER_BATCH", "4"],
            "SOLVER.IMS_PER_BATCH 4 cannot be split evenly over 3",
        ),
        ("1", ["SOLVER.NO_SUCH_KEY", "1"], "SOLVER.NO_SUCH_KEY"),
    ],
)
def test_train_net_refuses_with_a_message_and_no_traceback(num_gpus, opts, message):
    proc = subprocess.run(
        [
            sys.executable,
            "train_net.py",
            "--config-file",
            "projects/DigitScenes/configs/gfocalv2_R_18_digits.yaml",
            "--num-gpus",
            num_gpus,
            "MODEL.DEVICE",
            "cpu",
            *opts,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
