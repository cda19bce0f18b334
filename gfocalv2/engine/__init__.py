"""The Detectron2 workflow of gfocalv2, shared by ``train_net.py``, the tools of
``python -m gfocalv2.<tool>`` and the example projects: the config of a run, the ``Trainer``
(Detectron2's ``DefaultTrainer`` with the overrides of ``trainer.py``) and its hooks, several
processes (Detectron2's ``launch``), prediction. Entry points call ``gfocalv2.compat.apply()``
before importing it (see ``gfocalv2/__init__.py``).
"""

from ..data.datasets import check_datasets_registered, get_thing_classes, register_coco_datasets
from .arguments import workflow_argument_parser
from .config_setup import build_cfg, setup_cfg
from .trainer import Trainer

__all__ = [
    "Trainer",
    "build_cfg",
    "setup_cfg",
    "workflow_argument_parser",
    "register_coco_datasets",
    "check_datasets_registered",
    "get_thing_classes",
]
