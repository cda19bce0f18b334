"""Drawing predictions with Detectron2's Visualizer, shared by the demo tool and projects."""

import os

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.utils.visualizer import ColorMode, Visualizer

from .data.datasets import get_thing_classes

__all__ = ["metadata_for", "draw_predictions", "visualize_files"]


def metadata_for(cfg):
    """Metadata (class names) of ``DATASETS.TEST[0]`` (or TRAIN[0]); a generic one if neither
    exists."""
    names = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
    for name in names:
        try:
            classes = get_thing_classes(name)
        except Exception:  # unreadable/missing files: fall back to numbered classes
            classes = None
        if classes:
            return MetadataCatalog.get(name)
    meta = MetadataCatalog.get("__gfocalv2_unnamed")
    if not hasattr(meta, "thing_classes"):
        meta.thing_classes = [str(i) for i in range(cfg.MODEL.GFOCAL.NUM_CLASSES)]
    return meta


def draw_predictions(image_rgb, instances, metadata, score_threshold=0.0, scale=1.0):
    """Draw ``instances`` (on CPU, with pred_boxes/scores/pred_classes) scoring at least
    ``score_threshold`` on an RGB uint8 image; returns the RGB uint8 drawing."""
    keep = instances.scores >= score_threshold
    instances = instances[keep]
    vis = Visualizer(image_rgb, metadata, scale=scale, instance_mode=ColorMode.IMAGE)
    return vis.draw_instance_predictions(instances).get_image()


def visualize_files(predictor, metadata, image_files, output_dir, score_threshold=0.3, scale=1.0):
    """Run ``predictor`` (a DefaultPredictor) on ``image_files`` and write the drawings
    (PNG) into ``output_dir``; returns the list of written paths."""
    import cv2

    os.makedirs(output_dir, exist_ok=True)
    written = []
    for path in image_files:
        img_bgr = read_image(path, format="BGR")
        predictions = predictor(img_bgr)["instances"].to("cpu")
        drawing = draw_predictions(
            np.ascontiguousarray(img_bgr[:, :, ::-1]), predictions, metadata, score_threshold, scale
        )
        out = os.path.join(output_dir, os.path.splitext(os.path.basename(path))[0] + "_pred.png")
        cv2.imwrite(out, drawing[:, :, ::-1])
        written.append(out)
    return written
