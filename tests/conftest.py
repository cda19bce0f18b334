"""Shared test set-up: gfocalv2 first (it applies the Detectron2 compat layer), few threads, seeds."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import gfocalv2  # noqa: E402,F401
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
