"""Shared test set-up: gfocalv2 first (it applies the Detectron2 compat layer), few threads, seeds,
and the fixtures many tests use (a tiny generated DigitScenes, tiny registered COCO datasets).

``tests`` is a package: helpers are imported as ``from tests.utils.models import ...``, with
the repository root on the import path (``pythonpath = .`` in pytest.ini)."""

import os
from typing import NamedTuple

os.environ.setdefault("OMP_NUM_THREADS", "1")

from gfocalv2 import compat  # noqa: E402

compat.apply()  # the tests' entry point: before anything imports Detectron2

import gfocalv2.modeling  # noqa: E402,F401  (registers GFocalV2 and its backbones)
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory):
    """The tiny DigitScenes of ``tests.utils.workflow.TINY_PARAMS`` (8 train + 4 val scenes of
    64x64 pixels), generated once per session: ``{"train": (json_file, image_dir), "val": ...}``.
    Read it, do not change it (copy what a test modifies)."""
    from tests.utils.workflow import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_digits"))


class CocoDataset(NamedTuple):
    name: str
    json_file: str
    image_dir: str
    data: dict  # the json's content


@pytest.fixture(scope="session")
def coco_dataset(tmp_path_factory):
    """``coco_dataset(name, **kwargs)``: a tiny COCO dataset written in a new folder by
    ``tests.utils.reliability.write_coco(folder, **kwargs)`` (images with bright rectangles,
    3 categories with ids 1, 2, 5) and registered under ``name``; returns a :class:`CocoDataset`."""
    from tests.utils.reliability import register, write_coco

    def make(name, **kwargs):
        json_file, image_dir, data = write_coco(tmp_path_factory.mktemp(name), **kwargs)
        register(name, json_file, image_dir)
        return CocoDataset(name, json_file, image_dir, data)

    return make
