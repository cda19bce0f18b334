"""The `make demo` script end to end with a 2-iteration schedule (slow: it generates the full
DigitScenes dataset, about 15 s, and evaluates 200 images), and the CLIs' --help."""

import os
import subprocess
import sys

import pytest

from tests.utils.workflow import REPO, env_with_repo_on_pythonpath

SCRIPT = REPO / "projects" / "DigitScenes" / "train_digits.py"


@pytest.mark.parametrize("script", [REPO / "train_net.py", SCRIPT])
def test_cli_help(script):
    # This checkout's gfocalv2 (first on PYTHONPATH), not whichever one the venv has installed.
    out = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env_with_repo_on_pythonpath(),
    )
    assert out.returncode == 0, out.stderr
    assert (
        "--register-coco" in out.stdout and "--eval-only" in out.stdout and "--resume" in out.stdout
    )


@pytest.mark.slow
@pytest.mark.timeout(900)  # the subprocess's own limit is 600 s
def test_train_digits_end_to_end(tmp_path):
    env = env_with_repo_on_pythonpath(dict(os.environ, OMP_NUM_THREADS="1"))
    out_dir = tmp_path / "out"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--data-root",
        str(tmp_path / "digit_scenes"),
        "--num-vis",
        "2",
        "--vis-threshold",
        "0.0",
        "SOLVER.MAX_ITER",
        "2",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "SOLVER.WARMUP_ITERS",
        "1",
        "SOLVER.STEPS",
        "()",
        "MODEL.GFOCAL.SCORE_THRESH_TEST",
        "0.0",
        "MODEL.GFOCAL.DETECTIONS_PER_IMAGE",
        "5",
        "MODEL.DEVICE",
        "cpu",
        "DATALOADER.NUM_WORKERS",
        "0",
        "OUTPUT_DIR",
        str(out_dir),
    ]
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=env
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "DigitScenes training done" in res.stdout and "COCO bbox AP" in res.stdout
    assert (out_dir / "model_final.pth").is_file()
    assert (out_dir / "inference" / "coco_instances_results.json").is_file()
    assert len(os.listdir(out_dir / "visualizations")) == 2
    assert (tmp_path / "digit_scenes" / "STAMP.json").is_file()
