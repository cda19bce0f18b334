"""Training/evaluation workflow shared by ``train_net.py``, ``gfocalv2.demo`` and the projects.

Import :mod:`gfocalv2` (which this package does) before any other ``detectron2`` module.
"""
from .. import compat as _compat

_compat.apply()

from .datasets import (  # noqa: E402
    add_workflow_config,
    check_datasets_registered,
    get_thing_classes,
    register_coco_datasets,
)
from .defaults import Trainer, build_cfg, check_num_classes, setup_cfg, workflow_argument_parser  # noqa: E402

__all__ = [
    "Trainer",
    "build_cfg",
    "setup_cfg",
    "workflow_argument_parser",
    "add_workflow_config",
    "register_coco_datasets",
    "check_datasets_registered",
    "check_num_classes",
    "get_thing_classes",
]
