"""The config of a run: :func:`build_cfg` (Detectron2's defaults + gfocalv2's keys + a config
file + overrides + ``--register-coco``, every error naming the key and where it came from) and
:func:`setup_cfg` (the same, plus Detectron2's ``default_setup`` for training scripts)."""

import logging
import os

import torch
from detectron2.config import get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import add_gfocalv2_config
from ..config_checks import (
    ConfigValueError,
    check_solver_steps,
    merge_config_file,
    merge_config_list,
)
from ..data.datasets import register_coco_datasets
from ..modeling.inference_optimization import resolve_memory_format
from ..test_time_augmentation import tta_settings

__all__ = ["build_cfg", "setup_cfg"]

logger = logging.getLogger(__name__)


def _fall_back_to_cpu(cfg):
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(
            "MODEL.DEVICE is %r but CUDA is not available: using MODEL.DEVICE cpu", cfg.MODEL.DEVICE
        )
        cfg.MODEL.DEVICE = "cpu"


def build_cfg(config_file="", opts=None, register_coco=(), freeze=True):
    """A GFocalV2 config: Detectron2 defaults + ``MODEL.GFOCAL`` + ``DATASETS.REGISTER_COCO``,
    then ``config_file``, then ``opts`` (``[KEY, VALUE, ...]``), then ``register_coco`` triples.

    Registers the datasets of ``DATASETS.REGISTER_COCO``. Falls back to ``MODEL.DEVICE cpu``
    (with a warning) when CUDA is requested but unavailable. No logging/output-dir setup:
    :func:`setup_cfg` does that for training scripts.
    """
    cfg = get_cfg()
    add_gfocalv2_config(cfg)  # every key of gfocalv2/config.py
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"--config-file {config_file} does not exist")
        merge_config_file(cfg, config_file)  # errors name the file, the key and close matches
    if opts:
        if len(opts) % 2:
            raise ValueError(
                "config overrides must be KEY VALUE pairs, got an odd number of items: "
                f"{list(opts)}"
            )
        merge_config_list(cfg, list(opts))
    if register_coco:
        cfg.DATASETS.REGISTER_COCO = [list(e) for e in cfg.DATASETS.REGISTER_COCO] + [
            list(e) for e in register_coco
        ]
    check_solver_steps(cfg)  # steps >= MAX_ITER dropped with a warning, bad steps refused
    _fall_back_to_cpu(cfg)
    resolve_memory_format(
        cfg.TEST.MEMORY_FORMAT, cfg.MODEL.DEVICE
    )  # a bad value fails now, not after training
    if cfg.TEST.AUG.ENABLED:  # bad sizes fail now, not at the evaluation after training
        try:
            tta_settings(cfg)
        except ValueError as e:
            raise ConfigValueError(str(e)) from None
    if freeze:
        cfg.freeze()
    register_coco_datasets(cfg.DATASETS.REGISTER_COCO)
    return cfg


def setup_cfg(args, freeze=True):
    """Config + Detectron2's ``default_setup`` (logger, OUTPUT_DIR/config.yaml, env info, seeds)
    from parsed :func:`~gfocalv2.engine.arguments.workflow_argument_parser` arguments."""
    cfg = build_cfg(
        args.config_file, args.opts, getattr(args, "register_coco", None) or (), freeze=freeze
    )
    # default_setup's environment report imports torch.utils.cpp_extension, whose probe for a CUDA
    # toolkit (used to build C++ extensions, which training does not do) warns on machines
    # without one.
    probe = logging.getLogger("torch.utils.cpp_extension")
    level = probe.level
    probe.setLevel(logging.ERROR)
    try:
        default_setup(cfg, args)
    finally:
        probe.setLevel(level)
    # This package's messages, like Detectron2's: on the console of rank 0 only, and in
    # OUTPUT_DIR/log.txt (log.txt.rankN for the other processes).
    setup_logger(
        cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="gfocalv2", abbrev_name="gfocal"
    )
    return cfg
