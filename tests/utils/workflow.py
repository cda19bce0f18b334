"""Shared helpers of the workflow tests (train_net.py, demo, DigitScenes): a tiny generated
dataset and a tiny, fast config. The repository root is on the import path (pytest's rootdir,
``pythonpath`` in pytest.ini), so the DigitScenes example is imported as
``projects.DigitScenes.digit_scenes``."""

import importlib.util
import os
from pathlib import Path

from gfocalv2 import compat

compat.apply()  # first, before any other detectron2 import

REPO = Path(__file__).resolve().parents[2]
DIGITS_PROJECT = REPO / "projects" / "DigitScenes"
DIGITS_CONFIG = DIGITS_PROJECT / "configs" / "gfocalv2_R_18_digits.yaml"

#: A tiny DigitScenes: 8 train + 4 val scenes of 64x64 pixels, 1-3 digits of 12-28 px each.
TINY_PARAMS = {
    "seed": 0,
    "num_train": 8,
    "num_val": 4,
    "image_size": 64,
    "min_size": 12,
    "max_size": 28,
    "max_digits": 3,
}


def load_tool(name):
    """The script ``tools/<name>.py`` as a module, loaded from its file. Not ``from tools import
    <name>``: official Detectron2 built from source installs a ``tools`` package of its own into
    site-packages, and that package, not this repository's folder, is what the import finds."""
    spec = importlib.util.spec_from_file_location(
        f"gfocalv2_tools_{name}", REPO / "tools" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def env_with_repo_on_pythonpath(env=None):
    """A copy of ``env`` (default ``os.environ``) with the repository root first on PYTHONPATH:
    for subprocesses that import ``tests.utils`` or ``train_net``, wherever their script is."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def make_tiny_dataset(root):
    """Generate the tiny dataset under ``root``; returns {split: (json_file, image_dir)}."""
    from projects.DigitScenes.digit_scenes import prepare

    root = prepare(str(root), TINY_PARAMS)
    return {
        split: (os.path.join(root, f"{split}.json"), os.path.join(root, split))
        for split in ("train", "val")
    }


def tiny_opts(output_dir, train_name="tiny_digits_train", test_name="tiny_digits_val", max_iter=4):
    """Config overrides (KEY VALUE list) for a few fast CPU iterations at 64x64 on the tiny
    dataset."""
    return [
        "MODEL.DEVICE",
        "cpu",
        "DATASETS.TRAIN",
        f"('{train_name}',)",
        "DATASETS.TEST",
        f"('{test_name}',)",
        "INPUT.MIN_SIZE_TRAIN",
        "(64,)",
        "INPUT.MAX_SIZE_TRAIN",
        "64",
        "INPUT.MIN_SIZE_TEST",
        "64",
        "INPUT.MAX_SIZE_TEST",
        "64",
        "MODEL.FPN.OUT_CHANNELS",
        "32",
        "MODEL.GFOCAL.NUM_CONVS",
        "1",
        # keep low-score detections so that the untrained model still predicts boxes
        "MODEL.GFOCAL.SCORE_THRESH_TEST",
        "0.0",
        "MODEL.GFOCAL.DETECTIONS_PER_IMAGE",
        "20",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "SOLVER.BASE_LR",
        "0.005",
        "SOLVER.WARMUP_ITERS",
        "2",
        "SOLVER.STEPS",
        "()",
        "SOLVER.MAX_ITER",
        str(max_iter),
        "SOLVER.CHECKPOINT_PERIOD",
        "2",
        "DATALOADER.NUM_WORKERS",
        "0",
        "TEST.EVAL_PERIOD",
        "0",
        "OUTPUT_DIR",
        str(output_dir),
    ]
