"""GFocalV2 (Generalized Focal Loss V2) and GFL(V1) dense detectors for Detectron2.

As in Detectron2's projects, importing :mod:`gfocalv2.modeling` (which :mod:`gfocalv2.engine`
does) registers ``GFocalV2`` in ``META_ARCH_REGISTRY`` and this project's backbones in
``BACKBONE_REGISTRY``. Entry points first call ``gfocalv2.compat.apply()``, before anything
imports Detectron2: it fixes what this Detectron2 install needs, and nothing where nothing is
needed (see :mod:`gfocalv2.compat`)::

    from gfocalv2 import compat

    compat.apply()

    from gfocalv2.engine import Trainer, build_cfg

Importing the package itself imports neither torch nor Detectron2: :mod:`gfocalv2.runtime` runs
exported models where neither is installed.
"""

__version__ = "0.1.0"
__all__ = ["add_gfocalv2_config", "__version__"]


def __getattr__(name):
    if name == "add_gfocalv2_config":
        from .config import add_gfocalv2_config

        return add_gfocalv2_config
    raise AttributeError(f"module 'gfocalv2' has no attribute {name!r}")
