"""What --num-gpus N refuses before any process starts, with a message and exit status 2; the
one rule for batch-norm statistics (gfocalv2/modeling/norms.py) behind the BatchNorm check."""

import glob
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from tests.utils.models import REPO, gfocal_cfg

from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm

from gfocalv2.engine import build_cfg
from gfocalv2.engine.launch import LaunchError, check_launch
from gfocalv2.modeling.backbone import EvalBatchNorm2d
from gfocalv2.modeling.norms import (
    FIXED,
    PER_PROCESS,
    SYNCHRONIZED,
    batch_statistics,
    per_process_batch_norms,
    statistics_fixed,
)

ALL_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "COCO-Detection", "*.yaml")))
#: timm backbones (ConvNeXt-T, the lite config): no published model.
TIMM_CONFIGS = [f for f in ALL_CONFIGS if "_timm_" in f or "_lite_" in f]
PUBLISHED = [f for f in ALL_CONFIGS if f not in TIMM_CONFIGS]


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
    check_launch(cfg, 2)  # one per GPU is fine (BNEval in the base config)


@pytest.mark.parametrize("processes, machines", [(3, 1), (2, 3)])
def test_batch_that_the_processes_cannot_share(processes, machines):
    cfg = gfocal_cfg("SOLVER.IMS_PER_BATCH", 16)
    with pytest.raises(
        LaunchError,
        match=rf"SOLVER.IMS_PER_BATCH 16 cannot be split evenly over {processes * machines} "
        r"processes.*divides 16 \(\[1, 2, 4, 8, 16\]\)",
    ):
        check_launch(cfg, processes, machines)
    check_launch(cfg, 4, 2)


@pytest.mark.parametrize(
    "module, training, expected",
    [
        (FrozenBatchNorm2d(8), True, FIXED),
        (EvalBatchNorm2d(8), True, FIXED),  # "BNEval": statistics frozen, affine trained
        (EvalBatchNorm2d(8), False, FIXED),
        (nn.BatchNorm2d(8), False, FIXED),  # any BatchNorm in eval mode
        (nn.BatchNorm2d(8), True, PER_PROCESS),
        (nn.BatchNorm2d(8, track_running_stats=False), False, PER_PROCESS),  # batch stats always
        (nn.SyncBatchNorm(8), True, SYNCHRONIZED),
        (NaiveSyncBatchNorm(8), True, SYNCHRONIZED),
        (NaiveSyncBatchNorm(8), False, FIXED),
        (nn.GroupNorm(4, 8), True, None),
        (nn.LayerNorm(8), True, None),
        (nn.Conv2d(8, 8, 1), True, None),
    ],
)
def test_batch_statistics_of_every_kind_of_norm(module, training, expected):
    module.train(training)
    assert batch_statistics(module) == expected
    assert statistics_fixed(module) == (expected == FIXED)  # what BatchNorm folding folds


def test_per_process_batch_norms_names_the_modules():
    model = nn.Sequential(
        nn.BatchNorm2d(4), EvalBatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4), nn.GroupNorm(2, 4))
    ).train()
    assert per_process_batch_norms(model) == ["0", "2.0"]
    assert per_process_batch_norms(model.eval()) == []


@pytest.mark.parametrize("config_file", PUBLISHED, ids=os.path.basename)
def test_every_published_config_launches_with_several_processes(config_file):
    """The published norm (BNEval in the backbone, GN in the head) keeps the statistics equal in
    every process: accepted with 2 processes as with 8."""
    cfg = build_cfg(config_file, ["MODEL.DEVICE", "cpu"])
    assert cfg.MODEL.RESNETS.NORM == "BNEval"
    check_launch(cfg, 2)
    check_launch(cfg, 8)


def test_trained_batch_norm_needs_synchronized_statistics(monkeypatch):
    cfg = gfocal_cfg("MODEL.RESNETS.NORM", "BN", "SOLVER.IMS_PER_BATCH", 4)
    check_launch(cfg, 1)  # one process: nothing to keep equal
    with pytest.raises(
        LaunchError,
        match=r"BatchNorm with trained statistics \(backbone.bottom_up.res3.0.shortcut.norm, "
        r".* and \d+ more\) would train separately in each of the 2 processes.*"
        r"MODEL.RESNETS.NORM naiveSyncBN",
    ):
        check_launch(cfg, 2)
    cfg.MODEL.DEVICE = "cuda"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(LaunchError, match=r"MODEL.RESNETS.NORM SyncBN"):
        check_launch(cfg, 2)
    check_launch(cfg, 2, training=False)  # evaluation does not update the statistics
    for norm in ("naiveSyncBN", "FrozenBN", "BNEval", "GN"):
        check_launch(gfocal_cfg("MODEL.RESNETS.NORM", norm, "SOLVER.IMS_PER_BATCH", 4), 2)


def test_syncbn_needs_cuda_with_several_processes(monkeypatch):
    """PyTorch's SyncBatchNorm synchronizes CUDA tensors only: several CPU processes are refused
    before they start (each would fail at its first step), naming the key and the fix."""
    cfg = gfocal_cfg("MODEL.RESNETS.NORM", "SyncBN", "SOLVER.IMS_PER_BATCH", 4)
    check_launch(cfg, 1)
    with pytest.raises(
        LaunchError,
        match=r"SyncBN \(backbone.bottom_up.res3.0.shortcut.norm, .*CUDA tensors "
        r"only.*on cpu.*MODEL.RESNETS.NORM naiveSyncBN\)",
    ):
        check_launch(cfg, 2)
    cfg.MODEL.DEVICE = "cuda"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_launch(cfg, 2)


@pytest.mark.parametrize("config_file", TIMM_CONFIGS, ids=os.path.basename)
def test_timm_configs_launch_with_several_processes(config_file, monkeypatch):
    """The timm configs (their pretrained weights not downloaded for the check) run on several
    GPUs; on CPU processes the lite config's SyncBN head is refused with the fix, which runs."""
    cfg = build_cfg(config_file, ["SOLVER.IMS_PER_BATCH", 8])
    cfg.defrost()
    cfg.MODEL.DEVICE = "cuda"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    check_launch(cfg, 8)
    cfg.MODEL.DEVICE = "cpu"
    if cfg.MODEL.GFOCAL.NORM == "SyncBN":
        with pytest.raises(LaunchError, match="MODEL.GFOCAL.NORM naiveSyncBN"):
            check_launch(cfg, 2)
        cfg.MODEL.GFOCAL.NORM = "naiveSyncBN"
    check_launch(cfg, 2)


def test_cpu_ddp_through_detectron2s_create_ddp_model():
    """DefaultTrainer wraps the model with Detectron2's create_ddp_model: the model itself with
    one process (gfocalv2.compat leaves out device_ids for CPU models with several)."""
    from detectron2.engine.defaults import create_ddp_model

    model = torch.nn.Linear(2, 2)
    assert create_ddp_model(model, broadcast_buffers=False) is model


def _train_net(*argv):
    return subprocess.run(
        [sys.executable, "train_net.py", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.parametrize(
    "num_gpus, opts, message",
    [
        (
            "3",
            ["SOLVER.IMS_PER_BATCH", "4"],
            "SOLVER.IMS_PER_BATCH 4 cannot be split evenly over 3",
        ),
        ("1", ["SOLVER.NO_SUCH_KEY", "1"], "SOLVER.NO_SUCH_KEY"),
        (
            "2",
            ["SOLVER.IMS_PER_BATCH", "4", "MODEL.RESNETS.NORM", "BN"],
            "MODEL.RESNETS.NORM naiveSyncBN",
        ),
    ],
)
def test_train_net_refuses_with_a_message_and_no_traceback(num_gpus, opts, message):
    proc = _train_net(
        "--config-file",
        "projects/DigitScenes/configs/gfocalv2_R_18_digits.yaml",
        "--num-gpus",
        num_gpus,
        "MODEL.DEVICE",
        "cpu",
        *opts,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Starting" not in proc.stdout  # no process was started
