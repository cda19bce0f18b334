"""Compatibility with a pure-Python Detectron2 and with today's libraries.

This is the only place in the package that knows about Detectron2's install
variants. :func:`apply` runs once, when :mod:`gfocalv2` is imported, before any
other ``detectron2`` module is used.

Two worlds:

* **Official Detectron2, built from source** (``detectron2._C`` is a compiled
  extension). Nothing is changed.
* **The registries' Detectron2 0.6, Python sources only** (what
  ``tools/install_detectron2.py`` installs). Then:

  - ``detectron2._C`` is replaced by a stand-in module, so that modules importing
    it at load time (``detectron2.layers``, ``detectron2.evaluation``) import. Any
    use of a compiled op raises :class:`CompiledOpsUnavailable`, naming the op.
  - COCO evaluation's "fast" implementation (``COCOeval_opt``, compiled) is
    replaced by pycocotools' ``COCOeval``, which gives the same numbers.
  - Pillow >= 10 removed ``Image.LINEAR`` (a default argument in
    ``detectron2.data.transforms``): it is restored as ``BILINEAR``.
  - NumPy >= 1.24 removed ``np.bool``/``np.int``/``np.float`` (used in dataset
    statistics and mask code): they are restored as the builtins they aliased.
  - setuptools >= 81 no longer ships ``pkg_resources`` (``detectron2.model_zoo``
    imports it): a minimal stand-in with ``resource_filename`` is provided.
"""
import importlib
import importlib.util
import logging
import sys
import types

__all__ = ["apply", "has_compiled_ops", "CompiledOpsUnavailable", "COMPAT_STATE"]

logger = logging.getLogger(__name__)

#: What :func:`apply` did; tests and ``collect_env`` read it.
COMPAT_STATE = {"applied": False, "compiled_ops": None, "patches": []}


class CompiledOpsUnavailable(ImportError):
    """Raised when code needs one of Detectron2's compiled (C++/CUDA) ops."""


def has_compiled_ops():
    """True if ``detectron2._C`` is a real compiled extension."""
    mod = sys.modules.get("detectron2._C")
    if mod is not None:
        return not getattr(mod, "_GFOCALV2_STANDIN", False)
    try:
        return importlib.util.find_spec("detectron2._C") is not None
    except (ImportError, ValueError):
        return False


class _CompiledOpsStandIn(types.ModuleType):
    _GFOCALV2_STANDIN = True

    # What detectron2.utils.collect_env (run by default_setup) asks of the extension.
    @staticmethod
    def get_compiler_version():
        return "not compiled (pure-Python Detectron2)"

    @staticmethod
    def get_cuda_version():
        return "not compiled (pure-Python Detectron2)"

    @staticmethod
    def has_cuda():
        return False

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise CompiledOpsUnavailable(
            f"detectron2._C.{name} is a compiled Detectron2 op, and this Detectron2 was installed "
            "without its C++/CUDA extension (the pure-Python build from the package registries). "
            "Use an alternative that does not need it (gfocalv2's deformable ResNet uses "
            "torchvision.ops.deform_conv2d; COCO evaluation uses pycocotools), or build Detectron2 "
            "from source: https://detectron2.readthedocs.io/en/latest/tutorials/install.html"
        )


def _install_compiled_ops_standin():
    import detectron2

    standin = _CompiledOpsStandIn("detectron2._C", "Stand-in for Detectron2's missing compiled ops (gfocalv2.compat)")
    sys.modules["detectron2._C"] = standin
    detectron2._C = standin
    COMPAT_STATE["patches"].append("detectron2._C stand-in")


def _restore_pillow_linear():
    from PIL import Image

    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR
        COMPAT_STATE["patches"].append("PIL.Image.LINEAR")


def _restore_numpy_aliases():
    import numpy as np

    for name, builtin in (("bool", bool), ("int", int), ("float", float), ("complex", complex)):
        if not hasattr(np, name):
            setattr(np, name, builtin)
            COMPAT_STATE["patches"].append(f"numpy.{name}")


def _provide_pkg_resources():
    try:
        import pkg_resources  # noqa: F401

        return
    except ImportError:
        pass
    import importlib.resources

    def resource_filename(package, resource):
        return str(importlib.resources.files(package).joinpath(resource))

    shim = types.ModuleType("pkg_resources", "Minimal stand-in for setuptools' pkg_resources (gfocalv2.compat)")
    shim.resource_filename = resource_filename
    sys.modules["pkg_resources"] = shim
    COMPAT_STATE["patches"].append("pkg_resources.resource_filename")


def _use_pycocotools_for_fast_eval():
    from pycocotools.cocoeval import COCOeval

    # Importing fast_eval_api imports detectron2.evaluation, whose coco_evaluation
    # module binds COCOeval_opt by name: replace it in both places.
    fast_eval_api = importlib.import_module("detectron2.evaluation.fast_eval_api")
    coco_evaluation = importlib.import_module("detectron2.evaluation.coco_evaluation")
    fast_eval_api.COCOeval_opt = COCOeval
    coco_evaluation.COCOeval_opt = COCOeval
    COMPAT_STATE["patches"].append("COCOeval_opt -> pycocotools COCOeval")


def apply():
    """Make Detectron2 importable and usable here; idempotent. Returns COMPAT_STATE."""
    if COMPAT_STATE["applied"]:
        return COMPAT_STATE
    try:
        import detectron2  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "gfocalv2 needs Detectron2, which is not installed in this Python "
            f"({sys.executable}). Run `make install` in the gfocalv2 repository (it installs a "
            "pure-Python Detectron2 0.6 from the package registries), or build Detectron2 from "
            "source: https://detectron2.readthedocs.io/en/latest/tutorials/install.html"
        ) from e
    compiled = has_compiled_ops()
    COMPAT_STATE["compiled_ops"] = compiled
    if not compiled:
        _install_compiled_ops_standin()
        _restore_pillow_linear()
        _restore_numpy_aliases()
        _provide_pkg_resources()
        _use_pycocotools_for_fast_eval()
        logger.debug("gfocalv2.compat applied: %s", ", ".join(COMPAT_STATE["patches"]))
    COMPAT_STATE["applied"] = True
    return COMPAT_STATE
