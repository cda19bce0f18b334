"""Run a trained GFocalV2 on images or a video and draw the detections (Detectron2's demo).

    python -m gfocalv2.demo --config-file configs/COCO-Detection/gfocalv2_R_50_FPN_1x.yaml \\
        --input img.png some_dir/ 'scenes/*.png' --output out/ \\
        --confidence-threshold 0.3 --opts MODEL.WEIGHTS model_final.pth
    python -m gfocalv2.demo --config-file ... --video-input clip.mp4 --output out/ \\
        --opts MODEL.WEIGHTS w.pth

Class names come from ``MetadataCatalog`` of ``DATASETS.TEST[0]``: Detectron2's builtin
datasets (COCO, ...) are known, a COCO-format dataset is registered with ``--register-coco``;
a project whose datasets are made by code registers them in its own script, then calls
:func:`main` (as Detectron2's projects do). When the config's datasets are not registered,
a warning says so and the detections are drawn with class indices.
A missing input or an unreadable image is reported by name and skipped; the exit status is
1 when nothing could be processed.
"""

import argparse
import glob
import logging
import os
import sys
import time

import numpy as np

from . import compat

# an entry point (python -m gfocalv2.demo, gfocalv2-demo):
# the fixes come before anything imports Detectron2
compat.apply()

from .engine.arguments import (
    add_config_file_argument,
    add_opts_argument,
    add_register_coco_argument,
)

__all__ = ["get_parser", "setup_demo_cfg", "expand_inputs", "VisualizationDemo", "main"]

logger = logging.getLogger("gfocalv2.demo")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def get_parser():
    parser = argparse.ArgumentParser(
        description="GFocalV2 demo: detect objects in images or a video and draw them with "
        "Detectron2's Visualizer",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_file_argument(parser)
    parser.add_argument(
        "--input",
        nargs="+",
        default=[],
        help="image files, directories (all images inside) or quoted glob patterns",
    )
    parser.add_argument("--video-input", help="path to a video file")
    parser.add_argument(
        "--output",
        help="output directory (created if needed), or an image file name when there is exactly "
        "one input image. Without it, nothing is drawn, detections are only printed.",
    )
    parser.add_argument(
        "--confidence-threshold", type=float, default=0.3, help="minimum score of drawn detections"
    )
    add_register_coco_argument(
        parser, help="register a COCO-format dataset (for its class names); repeatable"
    )
    add_opts_argument(parser)
    return parser


def setup_demo_cfg(args):
    from .engine import build_cfg

    cfg = build_cfg(args.config_file, args.opts, args.register_coco, freeze=False)
    # Keep every candidate down to the drawing threshold (and no lower than the model's own).
    cfg.MODEL.GFOCAL.SCORE_THRESH_TEST = min(
        cfg.MODEL.GFOCAL.SCORE_THRESH_TEST, args.confidence_threshold
    )
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = min(
        cfg.MODEL.RETINANET.SCORE_THRESH_TEST, args.confidence_threshold
    )
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = min(
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST, args.confidence_threshold
    )
    cfg.freeze()
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"MODEL.WEIGHTS {weights} does not exist")
    if not weights:
        logger.warning(
            "MODEL.WEIGHTS is empty: the model has random weights "
            "(pass --opts MODEL.WEIGHTS path.pth)"
        )
    return cfg


def expand_inputs(inputs):
    """Expand files / directories / glob patterns to a sorted list of files.

    Returns ``(files, problems)``: ``problems`` lists ``(input, message)`` for inputs that
    name nothing.
    """
    files, problems = [], []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, f)
                for f in os.listdir(item)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not found:
                problems.append(
                    (item, f"directory {item} contains no image ({', '.join(IMAGE_EXTENSIONS)})")
                )
            files.extend(found)
        elif os.path.isfile(item):
            files.append(item)
        elif glob.has_magic(item):
            found = sorted(f for f in glob.glob(os.path.expanduser(item)) if os.path.isfile(f))
            if not found:
                problems.append((item, f"pattern {item!r} matches no file"))
            files.extend(found)
        else:
            problems.append((item, f"input {item} does not exist"))
    return files, problems


def _warn_if_class_names_unknown(cfg, metadata):
    """A warning when the class names are not those of a dataset of the config."""
    from detectron2.data import DatasetCatalog

    datasets = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
    if metadata.name in datasets:
        return
    unregistered = [n for n in datasets if n not in DatasetCatalog.list()]
    if unregistered:
        why = f"the config's datasets {', '.join(map(repr, unregistered))} are not registered"
    elif datasets:
        why = "the config's datasets have no class names (thing_classes)"
    else:
        why = "the config names no dataset (DATASETS.TEST / DATASETS.TRAIN)"
    logger.warning(
        "Class names unknown: %s; detections are labelled with class indices. Register the "
        "dataset with --register-coco NAME JSON IMAGE_DIR, or run the demo from a script that "
        "registers its datasets before calling gfocalv2.demo.main.",
        why,
    )


class VisualizationDemo:
    """DefaultPredictor + Visualizer with the dataset's class names."""

    def __init__(self, cfg, confidence_threshold=0.3):
        from .engine.predictor import (
            Predictor,
        )  # DefaultPredictor for gray/RGBA/extreme-size images, checked weights
        from .visualize import metadata_for

        self.cfg = cfg
        self.threshold = confidence_threshold
        self.metadata = metadata_for(cfg)
        _warn_if_class_names_unknown(cfg, self.metadata)
        self.predictor = Predictor(cfg)

    def run_on_image(self, image_bgr):
        """Returns (instances on CPU, drawn RGB image)."""
        from .visualize import draw_predictions

        instances = self.predictor(image_bgr)["instances"].to("cpu")
        instances = instances[instances.scores >= self.threshold]
        drawing = draw_predictions(
            np.ascontiguousarray(image_bgr[:, :, ::-1]), instances, self.metadata
        )
        return instances, drawing

    def run_on_video(self, video):
        """Yield (instances, drawn BGR frame) for each frame of a cv2.VideoCapture."""
        from detectron2.utils.video_visualizer import VideoVisualizer
        from detectron2.utils.visualizer import ColorMode

        vis = VideoVisualizer(self.metadata, ColorMode.IMAGE)
        while video.isOpened():
            ok, frame = video.read()
            if not ok:
                break
            instances = self.predictor(frame)["instances"].to("cpu")
            instances = instances[instances.scores >= self.threshold]
            drawn = vis.draw_instance_predictions(frame[:, :, ::-1], instances).get_image()
            yield instances, np.ascontiguousarray(drawn[:, :, ::-1])


def _output_path(output, path, single, used):
    if single and output.lower().endswith(IMAGE_EXTENSIONS) and not os.path.isdir(output):
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        return output
    os.makedirs(output, exist_ok=True)
    stem, ext = os.path.splitext(os.path.basename(path))
    ext = ext if ext.lower() in IMAGE_EXTENSIONS else ".png"
    name, k = stem + ext, 1
    while name in used:  # same file name from two directories
        name, k = f"{stem}_{k}{ext}", k + 1
    used.add(name)
    return os.path.join(output, name)


def _describe(instances, class_names):
    if len(instances) == 0:
        return "no detection"
    parts = []
    for c, s in zip(instances.pred_classes.tolist(), instances.scores.tolist()):
        name = class_names[c] if class_names and c < len(class_names) else str(c)
        parts.append(f"{name}:{s:.2f}")
    return f"{len(instances)} detections [" + ", ".join(parts) + "]"


def _run_images(demo, args):
    import cv2
    from detectron2.data.detection_utils import read_image

    files, problems = expand_inputs(args.input)
    for _, msg in problems:
        logger.error("%s: skipped", msg)
    classes = getattr(demo.metadata, "thing_classes", None)
    used, done, failed = set(), 0, len(problems)
    for path in files:
        try:
            img = read_image(path, format="BGR")
        except Exception as e:  # PIL.UnidentifiedImageError, truncated files, permissions...
            logger.error("cannot read image %s (%s: %s): skipped", path, type(e).__name__, e)
            failed += 1
            continue
        start = time.perf_counter()
        instances, drawing = demo.run_on_image(img)
        logger.info(
            "%s: %s in %.2fs", path, _describe(instances, classes), time.perf_counter() - start
        )
        if args.output:
            out = _output_path(args.output, path, len(files) == 1, used)
            if not cv2.imwrite(out, drawing[:, :, ::-1]):
                logger.error("could not write %s", out)
                failed += 1
                continue
            logger.info("  -> %s", out)
        done += 1
    logger.info("%d image(s) processed, %d problem(s)", done, failed)
    return done


def _run_video(demo, args):
    import cv2

    path = args.video_input
    if not os.path.isfile(path):
        logger.error("video input %s does not exist", path)
        return 0
    video = cv2.VideoCapture(path)
    if not video.isOpened():
        logger.error("cannot open video %s", path)
        return 0
    width, height = (
        int(video.get(cv2.CAP_PROP_FRAME_WIDTH)),
        int(video.get(cv2.CAP_PROP_FRAME_HEIGHT)),
    )
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    writer, out = None, None
    if args.output:
        out = args.output
        if os.path.isdir(out) or not os.path.splitext(out)[1]:
            os.makedirs(out, exist_ok=True)
            out = os.path.join(out, os.path.splitext(os.path.basename(path))[0] + ".mp4")
        writer = cv2.VideoWriter(
            out, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (width, height), True
        )
        if not writer.isOpened():
            logger.error("cannot open %s for writing (codec mp4v)", out)
            return 0
    frames = 0
    for _, frame in demo.run_on_video(video):
        frames += 1
        if writer is not None:
            writer.write(frame)
    video.release()
    if writer is not None:
        writer.release()
    logger.info("%s: %d frame(s) processed%s", path, frames, f" -> {out}" if out else "")
    if frames == 0:
        logger.error("video %s has no readable frame", path)
    return frames


def main(argv=None, parser=None):
    """Run the demo on ``argv`` (default: the command line); returns the exit status.

    ``parser``: default :func:`get_parser`; a project's script may pass that parser extended
    with flags of its own (which the demo ignores), e.g. after registering its datasets."""
    from detectron2.utils.logger import setup_logger

    parser = parser or get_parser()
    args = parser.parse_args(argv)
    setup_logger(name="fvcore")
    setup_logger(name="gfocalv2")
    if not args.input and not args.video_input:
        parser.error("give --input and/or --video-input")
    cfg = setup_demo_cfg(args)
    demo = VisualizationDemo(cfg, args.confidence_threshold)
    ok = 0
    if args.input:
        ok += _run_images(demo, args)
    if args.video_input:
        ok += _run_video(demo, args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
