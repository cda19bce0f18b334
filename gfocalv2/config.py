"""Every config key gfocalv2 adds to Detectron2's, with its default, in one place.

``add_gfocalv2_config(cfg)`` adds them in place (``gfocalv2.engine.build_cfg`` calls it).
The defaults of ``MODEL.GFOCAL`` are the authors' GFocalV2 (R-50, COCO);
``configs/Base-GFocalV2.yaml`` sets the Detectron2 keys (backbone, input, solver) that
their recipe also fixes. This module imports nothing from the package: the code that
reads a key reads it directly (``cfg.TEST.FOLD_BATCHNORM``), and checks of the values live
next to that code.
"""

import os

from detectron2.config import CfgNode as CN

__all__ = ["add_gfocalv2_config", "config_file_path"]


def _set_default(node, key, value):
    if key not in node:
        node[key] = value


def _add_model_config(cfg):
    # ----------------------------------------------------------- MODEL.GFOCAL: the detector
    if "GFOCAL" not in cfg.MODEL:
        cfg.MODEL.GFOCAL = CN()
    g = cfg.MODEL.GFOCAL
    defaults = [
        ("NUM_CLASSES", 80),
        # Backbone features fed to the head, from the finest to the coarsest level.
        ("IN_FEATURES", ["p3", "p4", "p5", "p6", "p7"]),
        # Shared towers: NUM_CONVS x [conv3x3 + NORM + ReLU] for classification and regression.
        ("NUM_CONVS", 4),
        # "GN" (32 groups, the reference), "" (conv with bias), or any Detectron2 norm.
        ("NORM", "GN"),
        ("PRIOR_PROB", 0.01),
        # General distribution of each box side over {0, 1, ..., REG_MAX} (in stride units).
        ("REG_MAX", 16),
        # Distribution-guided quality predictor (GFLV2). False gives GFLV1: the classification
        # branch then predicts the joint (class x IoU-quality) score by itself.
        ("DGQP_ENABLED", True),
        ("DGQP_TOPK", 4),
        ("DGQP_ADD_MEAN", True),
        ("DGQP_CHANNELS", 64),
        # ATSS: candidates per pyramid level for each ground-truth box.
        ("ATSS_TOPK", 9),
        # Losses.
        ("QFL_BETA", 2.0),
        ("QFL_WEIGHT", 1.0),
        ("DFL_WEIGHT", 0.25),
        ("GIOU_WEIGHT", 2.0),
        # Inference.
        ("SCORE_THRESH_TEST", 0.05),
        ("TOPK_CANDIDATES_TEST", 1000),  # per level, by max class score
        ("NMS_THRESH_TEST", 0.6),  # class-wise
        ("DETECTIONS_PER_IMAGE", 100),
    ]
    for key, value in defaults:
        _set_default(g, key, value)

    # ---------------------------------------------- MODEL.RES2NET: the Res2Net v1d backbone
    # (gfocalv2/modeling/backbone/res2net.py; depth, norm, deformable stages: MODEL.RESNETS)
    if "RES2NET" not in cfg.MODEL:
        cfg.MODEL.RES2NET = CN()
    # Number of splits of each bottleneck's 3x3 stage.
    _set_default(cfg.MODEL.RES2NET, "SCALES", 4)
    # Channels per split in res2, doubled in each later stage.
    _set_default(cfg.MODEL.RES2NET, "BASE_WIDTH", 26)

    # ------------------------------------ MODEL.TIMM: timm backbones (build_timm_fpn_backbone)
    # (gfocalv2/modeling/backbone/timm_backbone.py; levels: MODEL.FPN.IN_FEATURES, freezing:
    # MODEL.BACKBONE.FREEZE_AT, as for ResNet)
    if "TIMM" not in cfg.MODEL:
        cfg.MODEL.TIMM = CN()
    # Any timm model with features_only support (timm.list_models()).
    _set_default(cfg.MODEL.TIMM, "NAME", "")
    # timm's ImageNet weights from the Hugging Face hub (needs a network connection; offline:
    # `python -m gfocalv2.convert timm` a local checkpoint into MODEL.WEIGHTS). Not downloaded
    # when MODEL.WEIGHTS is set: those weights replace them.
    _set_default(cfg.MODEL.TIMM, "PRETRAINED", False)
    # BatchNorm statistics: "BNEval" (frozen statistics, trained affine), "FrozenBN", "BN",
    # "SyncBN" (CUDA), "naiveSyncBN". LayerNorm/GroupNorm (ConvNeXt, Swin) train either way.
    _set_default(cfg.MODEL.TIMM, "NORM", "BNEval")
    # Stochastic depth of the models that have it (ConvNeXt, Swin, EfficientNet); 0 = off.
    _set_default(cfg.MODEL.TIMM, "DROP_PATH_RATE", 0.0)

    # ----------------------------------------------------------------- weights (checkpoint.py)
    # When MODEL.WEIGHTS has a classification layer for another number of classes: True
    # re-initializes it (fine-tuning on a new dataset), False refuses the weights.
    _set_default(cfg.MODEL, "REINIT_HEAD_ON_CLASS_MISMATCH", False)


def _add_data_config(cfg):
    # --------------------------------------------------------- datasets (gfocalv2/data/)
    # [[NAME, JSON_FILE, IMAGE_DIR], ...]: COCO-format datasets registered from the config
    # (also --register-coco NAME JSON IMAGE_DIR on the command line; data/datasets.py).
    _set_default(cfg.DATASETS, "REGISTER_COCO", [])
    # What is checked of each image when a dataset is loaded: "none", "exists" (the file
    # exists), or "size" (also reads the header and compares the size with the json's).
    _set_default(cfg.DATASETS, "CHECK_IMAGES", "exists")
    # Training images that cannot be read are skipped with a warning; this many failures in
    # a row stop the run with an error listing them (data/loader.py).
    _set_default(cfg.DATALOADER, "MAX_CONSECUTIVE_FAILURES", 10)
    # Detectron2 after v0.6 has this key (square root in the repeat-factor sampler's
    # formula); added with the same default for Detectron2 0.6, so a config reads alike in both.
    _set_default(cfg.DATALOADER, "REPEAT_SQRT", True)
    # Pixel interpolation of the keep-ratio resize at train and test time (the sizes are
    # ResizeShortestEdge's either way): "pil-bilinear" is Detectron2's (PIL, antialiased
    # when shrinking), "cv2-bilinear" the reference's (OpenCV INTER_LINEAR, mmcv.imresize),
    # which configs/Base-GFocalV2.yaml sets (data/transforms.py).
    _set_default(cfg.INPUT, "RESIZE_BACKEND", "pil-bilinear")


def _add_inference_config(cfg):
    # ------------------------- exact inference speed-ups (modeling/inference_optimization.py)
    # Fold frozen BatchNorms into the preceding convolutions of the model that is evaluated.
    _set_default(cfg.TEST, "FOLD_BATCHNORM", True)
    # "auto" (channels last on CPU, where it was measured faster; contiguous elsewhere),
    # "channels_last" or "contiguous".
    _set_default(cfg.TEST, "MEMORY_FORMAT", "auto")


def _add_training_config(cfg):
    # ---------------------------------------------- training (engine/hooks.py, engine/trainer.py)
    # SIGTERM/SIGINT stop training after an iteration, with a checkpoint. With several
    # processes they agree on it every this many iterations (and after the last one); one
    # process checks after every iteration.
    _set_default(cfg.SOLVER, "STOP_CHECK_PERIOD", 10)
    # The optimizer (Trainer.build_optimizer): "SGD" is Detectron2's (SOLVER.MOMENTUM,
    # SOLVER.NESTEROV), "AdamW" is torch.optim.AdamW with betas SOLVER.BETAS (the ConvNeXt/Swin
    # recipes). Both get Detectron2's parameter groups (SOLVER.BASE_LR, WEIGHT_DECAY,
    # WEIGHT_DECAY_NORM, BIAS_LR_FACTOR, WEIGHT_DECAY_BIAS) and SOLVER.CLIP_GRADIENTS.
    _set_default(cfg.SOLVER, "OPTIMIZER", "SGD")
    # AdamW's (beta1, beta2): decay rates of the running means of the gradient and its square.
    _set_default(cfg.SOLVER, "BETAS", (0.9, 0.999))


def add_gfocalv2_config(cfg):
    """Add gfocalv2's keys (see the module source, one commented section each) to a
    Detectron2 config, in place, and return it. Keys already present keep their value, so
    calling it twice is harmless."""
    _add_model_config(cfg)
    _add_data_config(cfg)
    _add_inference_config(cfg)
    _add_training_config(cfg)
    return cfg


def config_file_path(name):
    """Path of one of this project's configs, ``name`` relative to ``configs/`` (e.g.
    ``"Base-GFocalV2.yaml"``); FileNotFoundError when the configs are not next to the package
    (a source checkout, or ``pip install -e``)."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"config {name} not found in {root}: gfocalv2's configs are read from the source "
            "checkout (install it with `pip install -e .`), or pass --config-file"
        )
    return path
