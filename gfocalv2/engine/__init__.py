"""The Detectron2 workflow of gfocalv2, shared by ``train_net.py``, the tools of
``python -m gfocalv2.<tool>`` and the example projects: the config of a run, the
``Trainer``, several processes, checkpoints, evaluation, prediction.

Import :mod:`gfocalv2` (which this package does) before any other ``detectron2`` module.
"""

from .. import compat as _compat

_compat.apply()

from ..data.datasets import check_datasets_registered, get_thing_classes, register_coco_datasets  # noqa: E402
from .arguments import workflow_argument_parser  # noqa: E402
from .config_setup import build_cfg, setup_cfg  # noqa: E402
from .trainer import Trainer  # noqa: E402

__all__ = [
    "Trainer",
    "build_cfg",
    "setup_cfg",
    "workflow_argument_parser",
    "register_coco_datasets",
    "check_datasets_registered",
    "get_thing_classes",
]
