"""GFocalV2 modeling: meta-architecture, head, ATSS assigner, losses, box coding, backbones,
and Detectron2's rival detectors built for comparison (:mod:`.baselines`, registers ``D2FCOS``)."""

from . import (
    backbone,  # noqa: F401  (registers the backbones)
    baselines,  # noqa: F401  (registers the "D2FCOS" meta-architecture)
)
from .atss import atss_assign
from .box_coder import box_to_distance, distance_to_box, distribution_to_distance
from .head import DistributionGuidedQualityPredictor, GFocalHead, Scale
from .losses import distribution_focal_loss, quality_focal_loss
from .meta_arch import GFocalV2

__all__ = [
    "GFocalV2",
    "GFocalHead",
    "DistributionGuidedQualityPredictor",
    "Scale",
    "atss_assign",
    "quality_focal_loss",
    "distribution_focal_loss",
    "distribution_to_distance",
    "distance_to_box",
    "box_to_distance",
]
