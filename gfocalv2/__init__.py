"""GFocalV2 (Generalized Focal Loss V2) and GFL(V1) dense detectors for Detectron2.

After ``import gfocalv2``, Detectron2 is set up for this project as soon as it is imported
(at once if it already is):

1. :mod:`gfocalv2.compat` is applied (so that ``detectron2.engine`` and
   ``detectron2.evaluation`` import even without Detectron2's compiled ops), and
2. ``GFocalV2`` is registered in ``META_ARCH_REGISTRY`` and this project's backbones in
   ``BACKBONE_REGISTRY`` (by importing :mod:`gfocalv2.modeling`).

So ``import gfocalv2`` first, then Detectron2, as Detectron2 projects do. Importing the
package itself imports neither torch nor Detectron2: :mod:`gfocalv2.runtime` runs exported
models where neither is installed.
"""

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"
__all__ = ["add_gfocalv2_config", "__version__"]


_SET_UP = {"state": "not yet"}  # "running", "done"


def _set_up_detectron2():
    """Apply :mod:`gfocalv2.compat`, then register the models; once. Re-entered from the
    first import of Detectron2 that ``compat.apply()`` itself makes: nothing to do then."""
    if _SET_UP["state"] != "not yet":
        return
    _SET_UP["state"] = "running"
    try:
        from . import compat

        compat.apply()
        from . import modeling  # noqa: F401  (the registrations)
    except BaseException:
        _SET_UP["state"] = "not yet"
        raise
    _SET_UP["state"] = "done"


class _SetUpAfterExecuting(importlib.abc.Loader):
    """Detectron2's own loader, then :func:`_set_up_detectron2` before anything else of
    Detectron2 is imported (its submodules, e.g. ``detectron2.layers``, need the fixes)."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _set_up_detectron2()

    def __getattr__(self, name):  # resource readers and the like: Detectron2's loader's
        return getattr(self._loader, name)


class _Detectron2Finder(importlib.abc.MetaPathFinder):
    """Finds ``detectron2`` as Python would, with :class:`_SetUpAfterExecuting` as its
    loader; then leaves ``sys.meta_path``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "detectron2":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("detectron2")
        if spec is not None and spec.loader is not None:
            spec.loader = _SetUpAfterExecuting(spec.loader)
        return spec


if "detectron2" in sys.modules:
    _set_up_detectron2()
elif not any(isinstance(f, _Detectron2Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Detectron2Finder())


def __getattr__(name):
    if name == "add_gfocalv2_config":
        from .config import add_gfocalv2_config

        return add_gfocalv2_config
    raise AttributeError(f"module 'gfocalv2' has no attribute {name!r}")
