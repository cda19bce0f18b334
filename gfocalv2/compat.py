"""Compatibility with partial or older Detectron2 installs and with today's libraries.

This is the only place in the package that knows about Detectron2's install
variants. Every entry point (``train_net.py``, ``python -m gfocalv2.<tool>``, the example
projects, a spawned worker: :mod:`gfocalv2.spawn`, the tests) calls :func:`apply` once, before
anything imports Detectron2. Each fix below is applied exactly when its
own need exists, decided independently of the others (an official, compiled
Detectron2 can still need the ``pkg_resources`` one, for example):

``_C`` stand-in
    *Needed when* ``detectron2._C`` does not exist (the registries' pure-Python
    Detectron2 0.6). *Does*: a module whose ops raise :class:`CompiledOpsUnavailable`,
    naming the op, so ``detectron2.layers``/``.evaluation`` import.
faster-coco-eval evaluation
    *Needed when* the ``_C`` stand-in is in place (COCO's "fast" evaluator is compiled).
    *Does*: ``COCOeval_opt`` -> faster-coco-eval's C++ ``COCOeval_faster`` (same numbers as
    pycocotools, about 10x faster), used as Detectron2 uses ``COCOeval_opt``; pycocotools'
    ``COCOeval`` (same numbers, slower) if ``faster_coco_eval`` is not installed.
``PIL.Image.LINEAR``
    *Needed when* Pillow >= 10 lacks it *and* Detectron2's
    ``data/transforms/transform.py`` uses it (v0.6; main uses ``BILINEAR``).
    *Does*: ``Image.LINEAR = Image.BILINEAR``.
NumPy aliases
    *Needed when* NumPy lacks ``np.bool``/``np.int``/... *and* Detectron2's sources use
    that alias (v0.6). *Does*: each alias that is both missing and used is restored as the
    builtin it stood for.
``pkg_resources``
    *Needed when* setuptools >= 81 (no ``pkg_resources``) *and*
    ``detectron2/model_zoo/model_zoo.py`` imports it (v0.6 and main alike). *Does*: a
    minimal ``pkg_resources`` with ``resource_filename``.
``launch`` without CUDA
    *Needed when* Detectron2's ``engine/launch.py`` asserts CUDA in its worker (v0.6; main
    runs its workers on gloo without CUDA). *Does*: ``_distributed_worker`` is main's: NCCL with
    CUDA, gloo without.
DDP of a CPU model
    *Needed when* Detectron2's ``create_ddp_model`` gives ``DistributedDataParallel``
    ``device_ids=[local rank]`` for every model (v0.6 and main), which DDP refuses for a CPU
    model; or when torch's DDP deprecates ``broadcast_buffers`` (what ``DefaultTrainer``
    passes) for ``forward_sync_buffers``. *Does*: ``create_ddp_model`` (as ``DefaultTrainer``
    calls it) leaves out ``device_ids`` for a CPU model, and passes ``broadcast_buffers`` as
    ``forward_sync_buffers`` where torch has it (the same behaviour in the forward pass).
quiet import
    *Needed*: always (harmless): torch deprecates ``torch.jit.script``, which fvcore's
    focal loss and Detectron2's ``box_regression`` call at import time. *Does*:
    ``detectron2.modeling`` is first imported with that one warning ignored (the user's own
    ``torch.jit.script`` calls still warn).
``torch.meshgrid`` warning
    *Needed when* Detectron2's ``anchor_generator.py`` calls it without ``indexing=``
    (v0.6 and main). *Does*: torch's once-per-process warning about the missing argument is
    used up silently.
``TypedStorage`` warning
    *Needed when* Detectron2's ``utils/comm.py`` serializes with ``torch.ByteStorage``
    (v0.6). *Does*: that deprecation warning is ignored when it comes from
    ``detectron2.utils.comm``.

What was applied is recorded in :data:`COMPAT_STATE` (``collect_env``-style
reports and the tests read it). The needs are read from Detectron2's source
files, without importing the modules that would fail.
"""

import importlib
import importlib.util
import logging
import os
import re
import sys
import types
import warnings

__all__ = [
    "apply",
    "has_compiled_ops",
    "CompiledOpsUnavailable",
    "COMPAT_STATE",
    "create_local_process_group",
]

logger = logging.getLogger(__name__)

#: What :func:`apply` did; tests and reports read it.
COMPAT_STATE = {"applied": False, "applying": False, "compiled_ops": None, "patches": []}

#: NumPy aliases removed in NumPy 1.24 (builtins they aliased); Detectron2 v0.6 uses some of them.
_NUMPY_ALIASES = {
    "bool": bool,
    "int": int,
    "float": float,
    "complex": complex,
    "object": object,
    "str": str,
}


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


# ----------------------------------------------------------------------------- reading the needs
def _detectron2_source(relative_path):
    """Text of a file of the installed ``detectron2`` package ('' if it has no such file)."""
    import detectron2

    path = os.path.join(os.path.dirname(detectron2.__file__), relative_path)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def _detectron2_numpy_aliases_used():
    """Names of the removed NumPy aliases (``np.int`` ...) that Detectron2's sources use."""
    import detectron2

    pattern = re.compile(r"\bnp\.(" + "|".join(_NUMPY_ALIASES) + r")\b(?![_\w])")
    used = set()
    for root, _, files in os.walk(os.path.dirname(detectron2.__file__)):
        for name in files:
            if name.endswith(".py"):
                try:
                    with open(os.path.join(root, name), encoding="utf-8") as f:
                        used.update(pattern.findall(f.read()))
                except (OSError, UnicodeDecodeError):
                    continue
    return used


def _module_missing(name):
    if name in sys.modules:
        return sys.modules[name] is None  # None in sys.modules blocks the import
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


# ----------------------------------------------------------------------------- the fixes
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
            "torchvision.ops.deform_conv2d; COCO evaluation uses faster-coco-eval), or build "
            "Detectron2 from source: see 'Installing on your own GPU machine' in gfocalv2's README"
        )


def _install_compiled_ops_standin():
    import detectron2

    standin = _CompiledOpsStandIn(
        "detectron2._C", "Stand-in for Detectron2's missing compiled ops (gfocalv2.compat)"
    )
    sys.modules["detectron2._C"] = standin
    detectron2._C = standin
    COMPAT_STATE["patches"].append("detectron2._C stand-in")


def _faster_coco_eval_class():
    """faster-coco-eval's evaluator in the role of Detectron2's ``COCOeval_opt`` (None if absent).

    Detectron2 (``_evaluate_predictions_on_coco``) calls ``COCOeval_opt(coco_gt, coco_dt,
    iou_type)`` with pycocotools ``COCO`` objects, sets ``params.maxDets``, ``.imgIds`` or
    ``.kpt_oks_sigmas``, runs ``evaluate()``, ``accumulate()``, ``summarize()``, then reads
    ``stats`` and ``eval["precision"]``. ``COCOeval_faster`` reads pycocotools' ``COCO`` objects
    as they are (``getAnnIds``, ``loadAnns``, ``imgs``) and evaluates and accumulates in C++. The
    subclass keeps what ``COCOeval_opt`` inherits from pycocotools: the constructor's parameters
    (every category of the ground truth, keypoints included) and ``summarize`` (the 12 ``stats``,
    at ``maxDets[2]``, and the printed table); progress goes to ``COCOeval_opt``'s logger.
    """
    try:
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        return None
    from pycocotools.cocoeval import COCOeval

    progress = logging.getLogger("detectron2.evaluation.fast_eval_api").info

    class FasterCOCOeval(COCOeval_faster):
        """``COCOeval_opt`` computed by faster-coco-eval (installed by gfocalv2.compat)."""

        def __init__(self, cocoGt=None, cocoDt=None, iouType="segm"):
            # cocoGt is set after: COCOeval_faster reads categories of keypoints from its own
            # COCO class (cat_img_map), which pycocotools' COCO objects do not have.
            super().__init__(None, cocoDt, iouType, print_function=progress)
            self.cocoGt = cocoGt
            if cocoGt is not None:
                self.params.imgIds = sorted(cocoGt.getImgIds())
                self.params.catIds = sorted(cocoGt.getCatIds())

        summarize = COCOeval.summarize

    return FasterCOCOeval


def _fast_coco_eval_without_compiled_ops():
    # Importing fast_eval_api imports detectron2.evaluation, whose coco_evaluation
    # module binds COCOeval_opt by name: replace it in both places.
    evaluator = _faster_coco_eval_class()
    if evaluator is not None:
        patch = "COCOeval_opt -> faster-coco-eval COCOeval_faster"
    else:
        from pycocotools.cocoeval import COCOeval as evaluator

        patch = "COCOeval_opt -> pycocotools COCOeval"
        logger.info(
            "faster-coco-eval is not installed: COCO evaluation uses pycocotools (same numbers, "
            "about 10x slower); `pip install faster-coco-eval` makes it fast"
        )
    fast_eval_api = importlib.import_module("detectron2.evaluation.fast_eval_api")
    coco_evaluation = importlib.import_module("detectron2.evaluation.coco_evaluation")
    fast_eval_api.COCOeval_opt = evaluator
    coco_evaluation.COCOeval_opt = evaluator
    COMPAT_STATE["patches"].append(patch)


def _restore_pillow_linear():
    from PIL import Image

    if hasattr(Image, "LINEAR") or "Image.LINEAR" not in _detectron2_source(
        "data/transforms/transform.py"
    ):
        return
    Image.LINEAR = Image.BILINEAR
    COMPAT_STATE["patches"].append("PIL.Image.LINEAR")


def _restore_numpy_aliases():
    import numpy as np

    missing = [
        name for name in _NUMPY_ALIASES if name not in vars(np)
    ]  # vars(): no deprecation warnings
    if not missing:
        return
    used = _detectron2_numpy_aliases_used()
    for name in missing:
        if name in used:
            setattr(np, name, _NUMPY_ALIASES[name])
            COMPAT_STATE["patches"].append(f"numpy.{name}")


def _provide_pkg_resources():
    if not _module_missing("pkg_resources"):
        return
    if "pkg_resources" not in _detectron2_source("model_zoo/model_zoo.py"):
        return
    import importlib.resources

    def resource_filename(package, resource):
        return str(importlib.resources.files(package).joinpath(resource))

    shim = types.ModuleType(
        "pkg_resources", "Minimal stand-in for setuptools' pkg_resources (gfocalv2.compat)"
    )
    shim.resource_filename = resource_filename
    sys.modules["pkg_resources"] = shim
    COMPAT_STATE["patches"].append("pkg_resources.resource_filename")


def create_local_process_group(num_workers_per_machine, machine_rank):
    """Detectron2's per-machine process group (``comm.get_local_rank()`` and friends read it).

    Detectron2 after v0.6 has ``comm.create_local_process_group``; v0.6 builds the group inside
    its CUDA-only ``launch`` and stores it in ``comm._LOCAL_PROCESS_GROUP``.
    """
    import torch.distributed as dist
    from detectron2.utils import comm

    if hasattr(comm, "create_local_process_group"):
        return comm.create_local_process_group(num_workers_per_machine)
    for i in range(dist.get_world_size() // num_workers_per_machine):
        group = dist.new_group(
            list(range(i * num_workers_per_machine, (i + 1) * num_workers_per_machine))
        )
        if i == machine_rank:  # every process creates every group, in the same order
            comm._LOCAL_PROCESS_GROUP = group
    return comm._LOCAL_PROCESS_GROUP


def _distributed_worker_without_cuda(
    local_rank, main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout
):
    """Detectron2 v0.6's launch worker as Detectron2 after v0.6 writes it: NCCL with CUDA, gloo
    without."""
    import torch
    import torch.distributed as dist
    from detectron2.utils import comm

    has_gpu = torch.cuda.is_available()
    dist.init_process_group(
        backend="NCCL" if has_gpu else "GLOO",
        init_method=dist_url,
        world_size=world_size,
        rank=machine_rank * num_gpus_per_machine + local_rank,
        timeout=timeout,
    )
    create_local_process_group(num_gpus_per_machine, machine_rank)
    if has_gpu:
        torch.cuda.set_device(local_rank)
    comm.synchronize()
    main_func(*args)


def _launch_without_cuda():
    source = _detectron2_source("engine/launch.py")
    if not re.search(r"assert torch\.cuda\.is_available\(\)", source):
        return
    launch = importlib.import_module("detectron2.engine.launch")
    launch._distributed_worker = _distributed_worker_without_cuda
    COMPAT_STATE["patches"].append("detectron2.engine.launch without CUDA (gloo)")


def _ddp_of_cpu_models():
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    source = _detectron2_source("engine/defaults.py")
    if "def create_ddp_model" not in source:
        return
    gives_device_ids = bool(
        re.search(r"\n\s+kwargs\[\"device_ids\"\] = \[comm\.get_local_rank\(\)\]", source)
    )
    sync_renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    if not (gives_device_ids or sync_renamed):
        return
    defaults = importlib.import_module("detectron2.engine.defaults")
    detectron2_create_ddp_model = defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if gives_device_ids and "device_ids" not in kwargs:
            if next(model.parameters()).device.type != "cuda":
                kwargs["device_ids"] = None
        if sync_renamed and "broadcast_buffers" in kwargs:
            kwargs["forward_sync_buffers"] = kwargs.pop("broadcast_buffers")
        return detectron2_create_ddp_model(model, **kwargs)

    create_ddp_model.__doc__ = detectron2_create_ddp_model.__doc__
    defaults.create_ddp_model = create_ddp_model  # the name DefaultTrainer.__init__ calls
    importlib.import_module("detectron2.engine").create_ddp_model = create_ddp_model
    COMPAT_STATE["patches"].append("create_ddp_model for CPU models")


#: torch's deprecation of ``torch.jit.script`` (a FutureWarning since torch 2.1x).
_TORCHSCRIPT_DEPRECATION = r"`torch\.jit\.script` is deprecated"


def _import_detectron2_modeling_quietly():
    # fvcore.nn.focal_loss and detectron2.modeling.box_regression script functions when imported:
    # without this, every `import gfocalv2` (and so every tool) starts with two warnings about
    # library code the user cannot change. Once imported, the modules are cached.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TORCHSCRIPT_DEPRECATION, category=FutureWarning)
        importlib.import_module("detectron2.modeling")


def _quiet_anchor_meshgrid():
    # Detectron2's anchor generator (v0.6 and main) calls torch.meshgrid without `indexing=`, so the
    # first forward of any model with anchors warns "torch.meshgrid: in an upcoming release, it will
    # be required to pass the indexing argument". torch gives that warning once per process: use
    # that once here, silently, with the same arguments Detectron2 gives (its result is the same).
    source = _detectron2_source("modeling/anchor_generator.py")
    if not re.search(r"torch\.meshgrid\((?![^)]*indexing)", source):
        return
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.meshgrid(torch.zeros(1), torch.zeros(1))
    COMPAT_STATE["patches"].append("torch.meshgrid warning of Detectron2's anchor generator")


def _quiet_comm_typed_storage():
    # v0.6's comm._serialize_to_tensor (all_gather/gather of Python objects: metrics, evaluation
    # results) uses torch.ByteStorage, which torch >= 2 deprecates with a UserWarning in every
    # process of a multi-process run. Ignored for warnings attributed to that module only.
    if "ByteStorage.from_buffer" not in _detectron2_source("utils/comm.py"):
        return
    warnings.filterwarnings(
        "ignore",
        message="TypedStorage is deprecated",
        category=UserWarning,
        module=r"detectron2\.utils\.comm",
    )
    COMPAT_STATE["patches"].append("TypedStorage warning of detectron2.utils.comm")


def apply():
    """Make Detectron2 importable and usable here; idempotent. Returns COMPAT_STATE."""
    if COMPAT_STATE["applied"] or COMPAT_STATE["applying"]:  # done, or being done (re-entered
        return COMPAT_STATE  # through an import that a fix makes)
    COMPAT_STATE["applying"] = True
    try:
        return _apply()
    finally:
        COMPAT_STATE["applying"] = False


def _apply():
    try:
        import detectron2  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "gfocalv2 needs Detectron2, which is not installed in this Python "
            f"({sys.executable}). Run `make install` in the gfocalv2 repository (it installs a "
            "pure-Python Detectron2 0.6 from the package registries), or build Detectron2 from "
            "source: see 'Installing on your own GPU machine' in gfocalv2's README"
        ) from e
    compiled = has_compiled_ops()
    COMPAT_STATE["compiled_ops"] = compiled
    # Library-level fixes first: detectron2.evaluation (imported by the last fix) imports
    # detectron2.data, which needs PIL's LINEAR on v0.6.
    _restore_pillow_linear()
    _restore_numpy_aliases()
    _provide_pkg_resources()
    if not compiled:
        _install_compiled_ops_standin()
    _import_detectron2_modeling_quietly()
    _quiet_anchor_meshgrid()
    _quiet_comm_typed_storage()
    if not compiled:
        _fast_coco_eval_without_compiled_ops()
    _launch_without_cuda()
    _ddp_of_cpu_models()
    if COMPAT_STATE["patches"]:
        logger.debug("gfocalv2.compat applied: %s", ", ".join(COMPAT_STATE["patches"]))
    COMPAT_STATE["applied"] = True
    return COMPAT_STATE
