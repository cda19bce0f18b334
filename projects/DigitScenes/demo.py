#!/usr/bin/env python
"""The demo tool for DigitScenes models: registers the DigitScenes datasets (so that the
detections are drawn with their class names, "0".."9"), then runs ``python -m gfocalv2.demo``.

    python projects/DigitScenes/demo.py --config-file output/digit_scenes/config.yaml \\
        --input datasets/digit_scenes/val/000000.png --output output/digit_scenes/demo \\
        --opts MODEL.WEIGHTS output/digit_scenes/model_final.pth

It takes every flag of ``python -m gfocalv2.demo`` plus ``--data-root`` (where the dataset is
cached, as for train_digits.py; generated there at first use, about 15 s). This is how a
Detectron2 project adds its datasets to a tool: the package knows nothing of the project.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)  # the digit_scenes package next to this script

from gfocalv2 import compat  # noqa: E402

compat.apply()  # first: what this Detectron2 install needs (gfocalv2/compat.py)

import gfocalv2.modeling  # noqa: E402,F401  (registers GFocalV2 and its backbones)

from gfocalv2 import demo  # noqa: E402


def get_parser():
    """``gfocalv2.demo``'s parser plus ``--data-root``."""
    parser = demo.get_parser()
    parser.description = "DigitScenes " + parser.description
    parser.epilog = __doc__ + "\n" + parser.epilog
    parser.add_argument(
        "--data-root",
        default=None,
        help="where the DigitScenes dataset is generated/cached "
        "(default: $DETECTRON2_DATASETS/digit_scenes, i.e. ./datasets/digit_scenes)",
    )
    return parser


def main(argv=None):
    """Register the DigitScenes datasets, then run ``gfocalv2.demo.main``; the exit status."""
    from detectron2.utils.logger import setup_logger

    from digit_scenes import register_digit_scenes

    parser = get_parser()
    args = parser.parse_args(argv)  # --help and usage errors before any data is generated
    if not args.input and not args.video_input:
        parser.error("give --input and/or --video-input")
    setup_logger(name="digit_scenes", abbrev_name="digits")
    register_digit_scenes(args.data_root)  # generates the data at first use
    return demo.main(argv, parser=parser)


if __name__ == "__main__":
    sys.exit(main())
