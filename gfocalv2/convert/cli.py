"""``python -m gfocalv2.convert`` (``gfocalv2-convert``): the argument parser and main."""

import argparse
import logging

from .backbone import ARCHS
from .files import convert_file
from .report import ConversionError

logger = logging.getLogger("gfocalv2.convert")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m gfocalv2.convert",
        description="Convert the authors' MMDetection GFocalV2/GFL checkpoints, ImageNet weights "
        "or timm checkpoints into Detectron2 checkpoints.",
    )
    parser.add_argument(
        "kind",
        choices=["mmdet", "imagenet", "timm"],
        help="mmdet: a released detector; imagenet: classification weights; timm: a timm "
        "checkpoint for the backbone build_timm_fpn_backbone (needs --name)",
    )
    parser.add_argument("src", help="source .pth (timm: also .safetensors, .bin)")
    parser.add_argument("dst", help="output .pth (Detectron2 checkpoint, for MODEL.WEIGHTS)")
    parser.add_argument(
        "--arch",
        choices=sorted(ARCHS),
        help="expected backbone (checked against the source; detected if omitted)",
    )
    parser.add_argument(
        "--name",
        default=None,
        help="timm: the timm model the checkpoint is for, e.g. convnext_tiny (default: "
        "MODEL.TIMM.NAME of --config-file)",
    )
    parser.add_argument(
        "--config-file",
        default=None,
        help="build the target model from this config instead of the detected architecture",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes of the target model (mmdet; default: the length of meta CLASSES, else "
        "gfl_cls outputs minus the background channel of GFLV2)",
    )
    parser.add_argument(
        "--no-strict",
        action="store_true",
        help="write the output even if keys were unmatched or missing (mmdet, imagenet; a timm "
        "checkpoint must match its model exactly)",
    )
    parser.add_argument(
        "opts",
        nargs="*",
        help="config overrides (KEY VALUE ...), with --config-file",
    )
    # Options may follow the positional arguments (``SRC DST --arch r50``, as the README writes
    # them): with a REMAINDER ``opts`` they were swallowed as config overrides and ignored.
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        convert_file(
            args.kind,
            args.src,
            args.dst,
            arch=args.arch,
            config_file=args.config_file,
            opts=args.opts,
            num_classes=args.num_classes,
            strict=not args.no_strict,
            name=args.name,
        )
    except ConversionError as e:
        logger.error("%s", e)
        return 1
    return 0
