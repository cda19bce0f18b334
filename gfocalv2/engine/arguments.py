"""Command-line arguments shared by every tool of the project.

``train_net.py`` and the example projects use :func:`workflow_argument_parser` (Detectron2's
``default_argument_parser``: ``--config-file``, ``--resume``, ``--eval-only``, ``--num-gpus``,
trailing ``KEY VALUE`` overrides); the tools of ``python -m gfocalv2.<tool>`` build their own
parser from the pieces below, so that ``--config-file``, ``--register-coco`` and ``--opts``
read the same everywhere.
"""

import argparse

from detectron2.engine import default_argument_parser

__all__ = [
    "workflow_argument_parser",
    "add_config_file_argument",
    "add_register_coco_argument",
    "add_opts_argument",
]

REGISTER_COCO_HELP = (
    "register a COCO-format dataset (json annotations + image folder) under NAME, usable in "
    "DATASETS.TRAIN/TEST; repeatable. Same as the config key DATASETS.REGISTER_COCO."
)


def workflow_argument_parser(epilog=None):
    """Detectron2's ``default_argument_parser`` plus ``--register-coco NAME JSON IMAGE_DIR``.

    Trailing ``KEY VALUE`` config overrides must come last (after all ``--flags``).
    """
    parser = default_argument_parser(epilog=epilog)
    add_register_coco_argument(parser)
    return parser


def add_config_file_argument(parser, required=False):
    """``--config-file FILE``, as Detectron2's tools spell it."""
    parser.add_argument(
        "--config-file",
        default="",
        required=required,
        metavar="FILE",
        help="path to the config file",
    )
    return parser


def add_register_coco_argument(parser, help=REGISTER_COCO_HELP):
    """``--register-coco NAME JSON IMAGE_DIR`` (repeatable), for
    :func:`~gfocalv2.engine.config_setup.build_cfg`'s ``register_coco``."""
    parser.add_argument(
        "--register-coco",
        nargs=3,
        action="append",
        default=[],
        metavar=("NAME", "JSON", "IMAGE_DIR"),
        help=help,
    )
    return parser


def add_opts_argument(parser):
    """``--opts KEY VALUE ...``: config overrides, last on the command line (as in
    Detectron2's demo)."""
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs, after every other flag, "
        "e.g. --opts MODEL.WEIGHTS model.pth",
    )
    return parser
