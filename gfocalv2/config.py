"""Config keys of gfocalv2, with the defaults of the authors' GFocalV2 (R-50, COCO)."""
from detectron2.config import CfgNode as CN

__all__ = ["add_gfocalv2_config"]


def add_gfocalv2_config(cfg):
    """Add the ``MODEL.GFOCAL`` node to a Detectron2 config, in place, and return it.

    The defaults are the reference implementation's; ``configs/Base-GFocalV2.yaml``
    sets the Detectron2 keys (backbone, input, solver) that the reference also fixes.
    Also adds the Res2Net backbone's ``MODEL.RES2NET`` node and the reliability keys
    (``MODEL.REINIT_HEAD_ON_CLASS_MISMATCH``, ``DATALOADER.MAX_CONSECUTIVE_FAILURES``,
    ``DATASETS.CHECK_IMAGES``; see ``gfocalv2/engine/config_checks.py``) and
    ``DATASETS.REGISTER_COCO`` (COCO-format datasets registered from the config), and
    ``TEST.FOLD_BATCHNORM`` / ``TEST.MEMORY_FORMAT`` (exact inference speed-ups; see
    ``gfocalv2/modeling/inference_optimization.py``), and ``INPUT.RESIZE_BACKEND`` (how images
    are resized at train and test time; see ``gfocalv2/data/transforms.py``).
    Calling it twice is harmless.
    """
    from .engine.config_checks import add_reliability_config
    from .engine.datasets import add_workflow_config
    from .modeling.backbone.res2net import add_res2net_config
    from .modeling.inference_optimization import add_inference_optimization_config

    add_res2net_config(cfg)
    add_inference_optimization_config(cfg)
    add_reliability_config(cfg)
    add_workflow_config(cfg)
    if "RESIZE_BACKEND" not in cfg.INPUT:
        # Pixel interpolation of the keep-ratio resize (ResizeShortestEdge's sizes either way):
        # "pil-bilinear" is Detectron2's (PIL, antialiased when shrinking), "cv2-bilinear" the
        # reference's (OpenCV INTER_LINEAR, mmcv.imresize), which configs/Base-GFocalV2.yaml sets.
        cfg.INPUT.RESIZE_BACKEND = "pil-bilinear"
    if "GFOCAL" in cfg.MODEL:
        return cfg
    cfg.MODEL.GFOCAL = g = CN()
    g.NUM_CLASSES = 80
    # Backbone features fed to the head, from the finest to the coarsest level.
    g.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # Shared towers: NUM_CONVS x [conv3x3 + NORM + ReLU] for classification and regression.
    g.NUM_CONVS = 4
    g.NORM = "GN"  # "GN" (32 groups, the reference), "" (conv with bias), or any Detectron2 norm
    g.PRIOR_PROB = 0.01
    # General distribution of each box side over {0, 1, ..., REG_MAX} (in stride units).
    g.REG_MAX = 16
    # Distribution-guided quality predictor (GFLV2). False gives GFLV1: the classification
    # branch then predicts the joint (class x IoU-quality) score by itself.
    g.DGQP_ENABLED = True
    g.DGQP_TOPK = 4
    g.DGQP_ADD_MEAN = True
    g.DGQP_CHANNELS = 64
    # ATSS: candidates per pyramid level for each ground-truth box.
    g.ATSS_TOPK = 9
    # Losses.
    g.QFL_BETA = 2.0
    g.QFL_WEIGHT = 1.0
    g.DFL_WEIGHT = 0.25
    g.GIOU_WEIGHT = 2.0
    # Inference.
    g.SCORE_THRESH_TEST = 0.05
    g.TOPK_CANDIDATES_TEST = 1000  # per level, by max class score
    g.NMS_THRESH_TEST = 0.6  # class-wise
    g.DETECTIONS_PER_IMAGE = 100
    return cfg
