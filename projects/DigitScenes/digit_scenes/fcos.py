"""Detectron2's FCOS (``detectron2.modeling.meta_arch.fcos.FCOS``) built from a yacs config.

Detectron2 0.6 ships FCOS only through its LazyConfig; this registers ``D2FCOS`` in
``META_ARCH_REGISTRY`` so that ``MODEL.META_ARCHITECTURE: "D2FCOS"`` builds Detectron2's own
FCOS class, with the head settings read from ``MODEL.RETINANET`` (IN_FEATURES, NUM_CLASSES,
NUM_CONVS, NORM, PRIOR_PROB, FOCAL_LOSS_*, SCORE_THRESH_TEST, TOPK_CANDIDATES_TEST,
NMS_THRESH_TEST) and ``TEST.DETECTIONS_PER_IMAGE``. Used for the comparison table only.
"""
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone

__all__ = ["build_d2_fcos"]


def _group_norm_32(channels):
    from torch import nn

    return nn.GroupNorm(min(32, channels), channels)


def build_d2_fcos(cfg):
    from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead

    r = cfg.MODEL.RETINANET
    backbone = build_backbone(cfg)
    shapes = backbone.output_shape()
    in_shapes = [shapes[f] for f in r.IN_FEATURES]
    channels = in_shapes[0].channels
    norm = r.NORM
    if norm == "GN":
        # Detectron2 0.6's RetinaNetHead probes get_norm(norm, 1), which GroupNorm(32, 1) rejects
        # in recent PyTorch: give it a callable that accepts any channel count.
        norm = _group_norm_32
    head = FCOSHead(
        input_shape=in_shapes,
        conv_dims=[channels] * r.NUM_CONVS,
        num_classes=r.NUM_CLASSES,
        norm=norm,
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


def D2FCOS(cfg):  # noqa: N802  (the registry name is the function name)
    return build_d2_fcos(cfg)


if "D2FCOS" not in META_ARCH_REGISTRY:
    META_ARCH_REGISTRY.register(D2FCOS)
