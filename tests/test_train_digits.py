"""The `make demo` script end to end with a 2-iteration schedule (slow: it generates the full
DigitScenes dataset, about 15 s, and evaluates 200 images), its full schedule against a measured
AP (slow: about 8 min), and the CLIs' --help."""

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


# Measured COCO bbox AP on digit_scenes_val after `make demo`'s schedule (600 x 16 images).
MEASURED_AP = {
    "seed 0, 2 threads (README)": 81.8,
    "seed 0, 1 thread": 80.1,
    "seed 1, 1 thread": 81.8,
}
AP_THRESHOLD = 75.0  # 5.1 below the lowest: 3 times the spread (1.7) of these three runs


@pytest.mark.slow
@pytest.mark.timeout(4000)  # the training subprocess's own limit is 3600 s
def test_demo_schedule_reaches_its_measured_ap(tmp_path):
    """Training works, judged by what it is for: `make demo`'s training (GFocalV2, R-18-FPN from
    scratch, 600 iterations of 16 images, lr x0.1 at 450 and 550, seed 0) reaches
    AP >= AP_THRESHOLD = 75.0 on digit_scenes_val. A broken learning-rate schedule, box
    transform, target assignment, loss or evaluator mapping would not.

    Measured: AP 81.8 (seed 0, 2 threads: the README's `make demo` run), 80.1 (seed 0, 1 thread)
    and 81.8 (seed 1, 1 thread), with

        OMP_NUM_THREADS=1 python projects/DigitScenes/train_digits.py --num-vis 0 SEED 1 \
            OUTPUT_DIR out

    Float rounding (thread count, CPU) makes training chaotic: runs that differ in the last bits
    end a few AP apart, hence the margin. Shorter schedules are not stable enough for a
    threshold: 300 iterations of 16 images gave AP 34.3 and 47.3 (seeds 0, 1), 600 of 8 images
    14.2 and 68.7 (the classification branch starts learning at a seed-dependent iteration).

    About 8 min on 2 idle CPU cores (2 threads, as `make demo`; the dataset is generated in
    ./datasets at first use, 15 s)."""
    import json

    out_dir = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--num-vis", "0", "SEED", "0", "OUTPUT_DIR", str(out_dir)]
    env = env_with_repo_on_pythonpath(dict(os.environ, OMP_NUM_THREADS="2"))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=REPO, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with open(out_dir / "metrics.json") as f:
        evaluations = [r for r in map(json.loads, filter(str.strip, f)) if "bbox/AP" in r]
    assert len(evaluations) == 1 and evaluations[0]["iteration"] == 600, evaluations
    ap = evaluations[0]["bbox/AP"]
    assert ap >= AP_THRESHOLD, f"AP {ap:.1f} < {AP_THRESHOLD} (measured: {MEASURED_AP})"
