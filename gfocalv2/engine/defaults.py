"""The Detectron2 training workflow for GFocalV2: config setup, argument parser, Trainer."""
import logging
import os
import weakref

import torch

from detectron2.config import get_cfg
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, default_argument_parser, default_setup
from detectron2.engine.train_loop import TrainerBase
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from detectron2.evaluation import COCOEvaluator

from ..config import add_gfocalv2_config
from ..modeling.inference_optimization import optimized_copy, resolve_memory_format
from .datasets import check_datasets_registered, get_thing_classes, register_coco_datasets
from .amp import CPUAutocastMixin
from .checkpoint import checkpointer_for
from .config_checks import check_solver_steps, merge_config_file, merge_config_list
from .distributed import check_batch_norm_across_processes, create_ddp_model
from .reliability import ReliableTrainerMixin

__all__ = ["Trainer", "workflow_argument_parser", "add_register_coco_argument", "build_cfg", "setup_cfg"]

logger = logging.getLogger(__name__)


def workflow_argument_parser(epilog=None):
    """Detectron2's ``default_argument_parser`` plus ``--register-coco NAME JSON IMAGE_DIR``.

    Trailing ``KEY VALUE`` config overrides must come last (after all ``--flags``).
    """
    parser = default_argument_parser(epilog=epilog)
    add_register_coco_argument(
        parser,
        "register a COCO-format dataset (json annotations + image folder) under NAME, "
        "usable in DATASETS.TRAIN/TEST; repeatable. Same as the config key DATASETS.REGISTER_COCO.",
    )
    return parser


def add_register_coco_argument(parser, help):
    """``--register-coco NAME JSON IMAGE_DIR`` (repeatable), for :func:`build_cfg`'s ``register_coco``."""
    parser.add_argument(
        "--register-coco", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_DIR"), help=help
    )


def _fall_back_to_cpu(cfg):
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE is %r but CUDA is not available: using MODEL.DEVICE cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"


def build_cfg(config_file="", opts=None, register_coco=(), freeze=True):
    """A GFocalV2 config: Detectron2 defaults + ``MODEL.GFOCAL`` + ``DATASETS.REGISTER_COCO``,
    then ``config_file``, then ``opts`` (``[KEY, VALUE, ...]``), then ``register_coco`` triples.

    Registers the datasets of ``DATASETS.REGISTER_COCO``. Falls back to ``MODEL.DEVICE cpu``
    (with a warning) when CUDA is requested but unavailable. No logging/output-dir setup:
    :func:`setup_cfg` does that for training scripts.
    """
    cfg = get_cfg()
    add_gfocalv2_config(cfg)  # MODEL.GFOCAL, MODEL.RES2NET, DATASETS.REGISTER_COCO, reliability keys
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"--config-file {config_file} does not exist")
        merge_config_file(cfg, config_file)  # errors name the file, the key and close matches
    if opts:
        if len(opts) % 2:
            raise ValueError(f"config overrides must be KEY VALUE pairs, got an odd number of items: {list(opts)}")
        merge_config_list(cfg, list(opts))
    if register_coco:
        cfg.DATASETS.REGISTER_COCO = [list(e) for e in cfg.DATASETS.REGISTER_COCO] + [list(e) for e in register_coco]
    check_solver_steps(cfg)  # steps >= MAX_ITER dropped with a warning, bad steps refused
    _fall_back_to_cpu(cfg)
    resolve_memory_format(cfg.TEST.MEMORY_FORMAT, cfg.MODEL.DEVICE)  # a bad value fails now, not after training
    if freeze:
        cfg.freeze()
    register_coco_datasets(cfg.DATASETS.REGISTER_COCO)
    return cfg


def setup_cfg(args, freeze=True):
    """Config + Detectron2's ``default_setup`` (logger, OUTPUT_DIR/config.yaml, env info, seeds)
    from parsed :func:`workflow_argument_parser` arguments."""
    cfg = build_cfg(
        args.config_file, args.opts, getattr(args, "register_coco", None) or (), freeze=freeze
    )
    # default_setup's environment report imports torch.utils.cpp_extension, whose probe for a CUDA
    # toolkit (used to build C++ extensions, which training does not do) warns on machines without one.
    probe = logging.getLogger("torch.utils.cpp_extension")
    level = probe.level
    probe.setLevel(logging.ERROR)
    try:
        default_setup(cfg, args)
    finally:
        probe.setLevel(level)
    # This package's messages, like Detectron2's: on the console of rank 0 only, and in
    # OUTPUT_DIR/log.txt (log.txt.rankN for the other processes).
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="gfocalv2", abbrev_name="gfocal")
    return cfg


class MultiProcessDefaultTrainer(DefaultTrainer):
    """``DefaultTrainer`` whose model is wrapped for several processes on CPU as on CUDA.

    Its ``__init__`` is Detectron2's (the same in v0.6 and later versions), except for two lines:
    the model goes through :func:`~gfocalv2.engine.distributed.create_ddp_model` (Detectron2's
    passes CUDA ``device_ids``, which a CPU model refuses), and a multi-process run with trained,
    unsynchronized BatchNorm is refused before anything starts.
    """

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):  # setup_logger is not called for d2
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        # Assume these objects must be constructed in this order.
        model = self.build_model(cfg)
        check_batch_norm_across_processes(model, cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)

        model = create_ddp_model(model, broadcast_buffers=False)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = checkpointer_for(cfg, model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg

        self.register_hooks(self.build_hooks())


class Trainer(ReliableTrainerMixin, CPUAutocastMixin, MultiProcessDefaultTrainer):
    """Detectron2's ``DefaultTrainer`` with COCO evaluation and a class-count check, made
    robust by :class:`~gfocalv2.engine.reliability.ReliableTrainerMixin` (checked datasets,
    skipped unreadable images, non-finite-loss stop with a last-good checkpoint, atomic
    checkpoints, bit-identical resume, AP 0 for a model that predicts nothing).

    Evaluation runs an optimized copy of the model (``TEST.FOLD_BATCHNORM``,
    ``TEST.MEMORY_FORMAT``). Everything else (SGD with warm-up + step schedule, periodic checkpoints to
    ``OUTPUT_DIR``, evaluation every ``TEST.EVAL_PERIOD`` and after the last iteration,
    ``metrics.json`` + TensorBoard events + console log with ETA, ``resume_or_load``) is
    Detectron2's.
    """

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate an optimized copy of ``model`` (BatchNorms folded, ``TEST.MEMORY_FORMAT``):
        same detections up to float rounding, faster; the training model is left as it is."""
        return super().test(cfg, optimized_copy(model, cfg), evaluators)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
            if len(cfg.DATASETS.TEST) > 1:
                output_folder = os.path.join(output_folder, dataset_name)
        return COCOEvaluator(dataset_name, tasks=("bbox",), output_dir=output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        check_datasets_registered(cfg)
        loader = super().build_train_loader(cfg)
        for name in cfg.DATASETS.TRAIN:  # thing_classes are known once the json is loaded
            check_num_classes(cfg, name)
        return loader

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        check_datasets_registered(cfg)
        loader = super().build_test_loader(cfg, dataset_name)
        check_num_classes(cfg, dataset_name)
        return loader


#: Where each meta-architecture reads its number of classes (others are not checked).
NUM_CLASSES_KEYS = {
    "GFocalV2": "MODEL.GFOCAL.NUM_CLASSES",
    "RetinaNet": "MODEL.RETINANET.NUM_CLASSES",
    "D2FCOS": "MODEL.RETINANET.NUM_CLASSES",
    "GeneralizedRCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
}


def num_classes_key(cfg):
    """The config key holding the model's number of classes, or None if unknown."""
    return NUM_CLASSES_KEYS.get(cfg.MODEL.META_ARCHITECTURE)


def check_num_classes(cfg, dataset_name):
    """Error if the dataset has more classes than the model predicts; warn if fewer."""
    key = num_classes_key(cfg)
    if key is None:
        return
    classes = get_thing_classes(dataset_name)
    if classes is None:
        return
    node = cfg
    for part in key.split("."):
        node = node[part]
    n = node
    if len(classes) > n:
        raise ValueError(
            f"Dataset {dataset_name!r} has {len(classes)} classes but {key} is {n}; set {key} {len(classes)}"
        )
    if len(classes) < n:
        logger.warning(
            "Dataset %r has %d classes but %s is %d (the extra outputs are never positive)",
            dataset_name, len(classes), key, n,
        )
