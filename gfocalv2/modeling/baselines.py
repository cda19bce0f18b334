"""Detectron2's own dense detectors, built to be compared with GFocalV2.

The rivals of the benchmark (``python -m gfocalv2.benchmark --compare retinanet,fcos``) and of
the DigitScenes comparison (``projects/DigitScenes/train_digits.py --compare``) live here, once:

* :func:`detectron2_retinanet`: Detectron2's model-zoo RetinaNet R-50-FPN 1x (yacs config)
  with the backbone, FPN, tower and classes of a GFocal config; random weights.
* :func:`detectron2_fcos`: Detectron2's model-zoo FCOS R-50-FPN 1x (a LazyConfig in
  Detectron2 0.6) with the backbone, FPN, tower and classes of a GFocal config; random weights.
* ``D2FCOS``: a meta-architecture registered in ``META_ARCH_REGISTRY`` (when this module is
  imported, which importing :mod:`gfocalv2.modeling` does) so that a yacs config with
  ``MODEL.META_ARCHITECTURE: "D2FCOS"`` builds Detectron2's own FCOS class
  (:func:`build_d2_fcos`), the head settings read from ``MODEL.RETINANET``.
* :func:`group_norm_32`: the ``"GN"`` norm as a callable, for Detectron2 0.6's heads.

Everything Detectron2-specific is imported when a model is built, not at import time.
"""

from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from .backbone.resnet import resolve_norm

__all__ = ["group_norm_32", "detectron2_retinanet", "detectron2_fcos", "build_d2_fcos", "D2FCOS"]


def group_norm_32(channels: int) -> nn.Module:
    """Detectron2's ``"GN"`` norm (``GroupNorm(32, channels)``) as a callable that also
    accepts fewer than 32 channels (then one group per channel).

    Why: Detectron2 0.6's ``RetinaNetHead`` (which ``FCOSHead`` extends) probes the type of
    its norm with ``get_norm(norm, 1)``; with ``"GN"`` that builds ``GroupNorm(32, 1)``,
    which today's PyTorch rejects, so a head with ``norm="GN"`` cannot be built at all.
    Passing this callable instead survives the probe (``GroupNorm(1, 1)``) and builds the
    very layers ``"GN"`` builds, ``GroupNorm(32, channels)``, for every real width of 32
    channels or more (a width that 32 does not divide fails exactly as ``"GN"`` and this
    project's own head do, rather than silently normalizing differently). Detectron2 after
    v0.6 probes with 32 channels; there this callable is unnecessary but harmless.
    """
    return nn.GroupNorm(min(32, channels), channels)


def detectron2_retinanet(cfg) -> nn.Module:
    """Detectron2's model-zoo RetinaNet R-50-FPN 1x (``COCO-Detection/retinanet_R_50_FPN_1x.yaml``)
    with the ResNet (depth, width, groups, stride placement, norm, frozen stages), FPN
    channels, tower depth (``MODEL.GFOCAL.NUM_CONVS``), number of classes and device of the
    GFocal config ``cfg``; random weights."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    r = get_cfg()
    r.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
    r.MODEL.WEIGHTS = ""
    r.MODEL.DEVICE = cfg.MODEL.DEVICE
    # The same ResNet: the model zoo's is MSRA-style (stride in the 1x1 conv), ours
    # pytorch-style (stride in the 3x3), 4% more backbone FLOPs at the same depth.
    for key in ("DEPTH", "RES2_OUT_CHANNELS", "NUM_GROUPS", "WIDTH_PER_GROUP", "STRIDE_IN_1X1"):
        setattr(r.MODEL.RESNETS, key, getattr(cfg.MODEL.RESNETS, key))
    # Our norm names ("BNEval") are classes for Detectron2's get_norm; yacs refuses
    # non-primitive values through setattr, so store it as a plain dict item.
    dict.__setitem__(r.MODEL.RESNETS, "NORM", resolve_norm(cfg.MODEL.RESNETS.NORM))
    r.MODEL.BACKBONE.FREEZE_AT = cfg.MODEL.BACKBONE.FREEZE_AT
    r.MODEL.FPN.OUT_CHANNELS = cfg.MODEL.FPN.OUT_CHANNELS
    r.MODEL.RETINANET.NUM_CLASSES = cfg.MODEL.GFOCAL.NUM_CLASSES
    r.MODEL.RETINANET.NUM_CONVS = cfg.MODEL.GFOCAL.NUM_CONVS
    return build_model(r)


def detectron2_fcos(cfg) -> nn.Module:
    """Detectron2's model-zoo FCOS R-50-FPN 1x (the LazyConfig
    ``COCO-Detection/fcos_R_50_FPN_1x.py``) with the ResNet (depth, stride placement, norm,
    frozen stages), FPN channels, tower depth (``MODEL.GFOCAL.NUM_CONVS``), number of classes
    and device of the GFocal config ``cfg``; GroupNorm in the head (:func:`group_norm_32`);
    random weights."""
    from detectron2 import model_zoo
    from detectron2.config import instantiate
    from detectron2.layers import ShapeSpec

    lazy = model_zoo.get_config("COCO-Detection/fcos_R_50_FPN_1x.py")
    m = lazy.model
    res, channels = cfg.MODEL.RESNETS, cfg.MODEL.FPN.OUT_CHANNELS
    m.backbone.bottom_up.stem.norm = resolve_norm(res.NORM)
    m.backbone.bottom_up.stages.depth = res.DEPTH
    m.backbone.bottom_up.stages.norm = resolve_norm(res.NORM)
    m.backbone.bottom_up.freeze_at = cfg.MODEL.BACKBONE.FREEZE_AT
    if res.DEPTH in (18, 34):  # basic blocks take no stride_in_1x1
        del m.backbone.bottom_up.stages.stride_in_1x1
    else:
        m.backbone.bottom_up.stages.stride_in_1x1 = res.STRIDE_IN_1X1
    m.backbone.out_channels = channels
    m.backbone.top_block.in_channels = channels
    m.head.input_shape = [ShapeSpec(channels=channels)] * 5
    m.head.conv_dims = [channels] * cfg.MODEL.GFOCAL.NUM_CONVS
    m.num_classes = cfg.MODEL.GFOCAL.NUM_CLASSES
    m.head.norm = group_norm_32  # the zoo's "GN", buildable in Detectron2 0.6 (see there)
    return instantiate(m).to(cfg.MODEL.DEVICE)


def build_d2_fcos(cfg) -> nn.Module:
    """Detectron2's ``FCOS`` class (``detectron2.modeling.meta_arch.fcos``) from a yacs config:
    the backbone of ``MODEL.BACKBONE``; the head and inference settings from
    ``MODEL.RETINANET`` (IN_FEATURES, NUM_CLASSES, NUM_CONVS, NORM, PRIOR_PROB,
    FOCAL_LOSS_ALPHA/GAMMA, SCORE_THRESH_TEST, TOPK_CANDIDATES_TEST, NMS_THRESH_TEST) and
    ``TEST.DETECTIONS_PER_IMAGE``; ``MODEL.PIXEL_MEAN/STD``. Detectron2 0.6 ships FCOS only
    through its LazyConfig; this is what ``MODEL.META_ARCHITECTURE: "D2FCOS"`` builds."""
    from detectron2.modeling import build_backbone
    from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead

    r = cfg.MODEL.RETINANET
    backbone = build_backbone(cfg)
    shapes = backbone.output_shape()
    in_shapes = [shapes[f] for f in r.IN_FEATURES]
    channels = in_shapes[0].channels
    head = FCOSHead(
        input_shape=in_shapes,
        conv_dims=[channels] * r.NUM_CONVS,
        num_classes=r.NUM_CLASSES,
        norm=group_norm_32 if r.NORM == "GN" else r.NORM,  # "GN": see group_norm_32
        prior_prob=r.PRIOR_PROB,
    )
    return FCOS(
        backbone=backbone,
        head=head,
        head_in_features=list(r.IN_FEATURES),
        num_classes=r.NUM_CLASSES,
        focal_loss_alpha=r.FOCAL_LOSS_ALPHA,
        focal_loss_gamma=r.FOCAL_LOSS_GAMMA,
        test_score_thresh=r.SCORE_THRESH_TEST,
        test_topk_candidates=r.TOPK_CANDIDATES_TEST,
        test_nms_thresh=r.NMS_THRESH_TEST,
        max_detections_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
        pixel_mean=cfg.MODEL.PIXEL_MEAN,
        pixel_std=cfg.MODEL.PIXEL_STD,
    )


def D2FCOS(cfg) -> nn.Module:  # noqa: N802  (the registry name is the function's name)
    """``MODEL.META_ARCHITECTURE: "D2FCOS"``: :func:`build_d2_fcos`."""
    return build_d2_fcos(cfg)


if "D2FCOS" not in META_ARCH_REGISTRY:
    META_ARCH_REGISTRY.register(D2FCOS)
