"""GFocalV2 (Generalized Focal Loss V2) and GFL(V1) dense detectors for Detectron2.

Importing this package
  1. applies :mod:`gfocalv2.compat` (so that ``detectron2.engine`` and
     ``detectron2.evaluation`` import even without Detectron2's compiled ops), and
  2. registers ``GFocalV2`` in ``META_ARCH_REGISTRY`` and this project's backbones in
     ``BACKBONE_REGISTRY``.
"""

__version__ = "0.1.0"

from . import compat as _compat

_compat.apply()

from . import modeling  # noqa: E402,F401  (registers the meta-architecture and backbones)
from .config import add_gfocalv2_config  # noqa: E402

__all__ = ["add_gfocalv2_config", "__version__"]
