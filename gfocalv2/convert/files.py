"""Reading a source checkpoint, and converting one file into a Detectron2 checkpoint."""

import logging
from collections import OrderedDict
from typing import Dict, Tuple

import torch

from .backbone import ARCHS, _strip_prefix, detect_backbone
from .imagenet import convert_imagenet
from .mmdet import _infer_head, convert_mmdet
from .report import ConversionError
from .target import build_target_cfg, build_target_state, check_against_model
from .timm_weights import convert_timm, pixel_normalization, timm_target_name

logger = logging.getLogger("gfocalv2.convert")


def load_source(path: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Read a checkpoint file; return (state dict of tensors, meta dict).

    Accepts a bare state dict, ``{"state_dict": ..., "meta": ...}`` (MMCV) and
    ``{"model": ...}`` (Detectron2 / others). A ``module.`` prefix (DataParallel) is removed.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (old MMCV files pickle a few non-tensor objects in "meta")
        logger.warning(
            "%s does not load with weights_only=True (%s); loading it as a full pickle. "
            "Only do this with files from a source you trust.",
            path,
            type(e).__name__,
        )
        obj = torch.load(path, map_location="cpu", weights_only=False)
    meta = {}
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        meta = obj.get("meta") or {}
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: no state dict found (got {type(obj).__name__})")
    state = OrderedDict()
    for k, v in obj.items():
        if k.startswith("module."):
            k = k[len("module.") :]
        if not isinstance(v, torch.Tensor):
            try:
                import numpy as np

                if isinstance(v, np.ndarray):
                    v = torch.from_numpy(v)
            except ImportError:
                pass
        if not isinstance(v, torch.Tensor):
            raise ConversionError(f"{path}: value of key {k} is a {type(v).__name__}, not a tensor")
        state[k] = v
    return state, meta if isinstance(meta, dict) else {}


def convert_file(
    kind: str,
    src: str,
    dst: str,
    *,
    arch=None,
    config_file=None,
    opts=(),
    num_classes=None,
    strict=True,
    name=None,
):
    """Convert ``src`` into the Detectron2 checkpoint ``dst``; returns the ConversionReport.

    ``name``: the timm model name (kind ``timm`` only; default: MODEL.TIMM.NAME of
    ``config_file``)."""
    if kind == "timm":
        if arch is not None or num_classes is not None:
            raise ConversionError(
                "--arch and --num-classes are for kinds mmdet and imagenet; kind timm takes "
                "--name (the timm model name)"
            )
        return convert_timm_file(src, dst, name=name, config_file=config_file, opts=opts)
    if name is not None:
        raise ConversionError(
            f"--name is for kind timm (a timm model name); kind {kind} takes --arch"
        )
    state, meta = load_source(src)
    if kind == "mmdet":
        backbone_state = _strip_prefix(state, "backbone.")
    else:
        backbone_state = (
            _strip_prefix(state, "backbone.")
            if state and all(k.startswith("backbone.") for k in state)
            else state
        )
    info = detect_backbone(backbone_state)
    logger.info("source backbone: %s (%s)", info.arch, info)
    if arch is not None:
        family, depth, groups, width = ARCHS[arch]
        found = (info.family, info.depth, info.num_groups, info.width_per_group)
        if found != (family, depth, groups, width):
            raise ConversionError(
                f"--arch {arch} does not match the source backbone, which is {info.arch} {found}"
            )
    detector = kind == "mmdet"
    if detector:
        n_cls, reg_max, dgqp = _infer_head(state)
        if num_classes is None and config_file is None:
            classes = meta.get("CLASSES") if isinstance(meta, dict) else None
            if classes:
                num_classes = len(classes)
            else:
                num_classes = n_cls - 1 if dgqp is not None else n_cls
                logger.info(
                    "no class list in the checkpoint's meta: assuming %d classes", num_classes
                )
        cfg = build_target_cfg(
            info,
            detector=True,
            num_classes=num_classes or 80,
            reg_max=reg_max,
            dgqp=dgqp,
            config_file=config_file,
            opts=opts,
        )
        if num_classes is not None:
            cfg.MODEL.GFOCAL.NUM_CLASSES = num_classes
        num_classes = cfg.MODEL.GFOCAL.NUM_CLASSES
        levels = tuple(int(f[-1]) for f in cfg.MODEL.FPN.IN_FEATURES)
        converted, report = convert_mmdet(state, num_classes, family=info.family, fpn_levels=levels)
    else:
        cfg = build_target_cfg(info, detector=False, config_file=config_file, opts=opts)
        converted, report = convert_imagenet(backbone_state, family=info.family)
    target = build_target_state(cfg, detector)
    check_against_model(converted, target, report)
    if not detector:
        # Deformable offsets are not part of ImageNet weights: they start at zero (their init).
        offsets = [k for k in report.missing if ".conv2_offset" in k]
        if offsets:
            report.missing = [k for k in report.missing if k not in offsets]
            report.notes.append(
                f"{len(offsets)} deformable-offset tensors (conv2_offset) keep their zero init"
            )
    report.log()
    if strict and report.problems:
        raise ConversionError(
            f"{len(report.problems)} problem(s) converting {src} (use --no-strict to write "
            "anyway):\n  " + "\n  ".join(report.problems)
        )
    torch.save(
        {
            "model": converted,
            "__author__": f"gfocalv2.convert {kind} from {src}",
            "matching_heuristics": False,
        },
        dst,
    )
    logger.info("wrote %s (%d tensors)", dst, len(converted))
    return report


def _save_atomically(obj, dst: str):
    """Write ``obj`` to ``dst`` through a temporary file: never a partial ``dst``."""
    from gfocalv2.checkpoint import atomic_torch_save

    try:
        atomic_torch_save(obj, dst)
    except OSError as e:
        raise ConversionError(f"cannot write {dst}: {e}") from e


def convert_timm_file(src: str, dst: str, *, name=None, config_file=None, opts=()):
    """A timm checkpoint file -> the Detectron2 checkpoint ``dst`` for ``build_timm_fpn_backbone``
    with MODEL.TIMM.NAME ``name`` (or that of ``config_file``); returns the ConversionReport.
    Nothing is written unless every tensor of the feature extractor comes from ``src``."""
    name, cfg = timm_target_name(name, config_file, opts)
    converted, report, pretrained_cfg = convert_timm(src, name)
    report.log()
    if report.problems:
        raise ConversionError(
            f"{len(report.problems)} problem(s) converting {src} for timm model {name}:\n  "
            + "\n  ".join(report.problems)
        )
    _save_atomically(
        {
            "model": converted,
            "__author__": f"gfocalv2.convert timm ({name}) from {src}",
            "matching_heuristics": False,
        },
        dst,
    )
    logger.info("wrote %s (%d tensors)", dst, len(converted))
    norm = pixel_normalization(pretrained_cfg)
    if cfg is not None and norm is not None:
        from gfocalv2.modeling.backbone.timm_backbone import check_pixel_normalization

        check_pixel_normalization(cfg, pretrained_cfg)
    logger.info(
        "use it with MODEL.BACKBONE.NAME build_timm_fpn_backbone MODEL.TIMM.NAME %s "
        "MODEL.TIMM.PRETRAINED False MODEL.WEIGHTS %s%s",
        name,
        dst,
        (
            f" (these weights were trained on RGB images normalized with MODEL.PIXEL_MEAN "
            f"{norm[0]} MODEL.PIXEL_STD {norm[1]})"
            if norm
            else ""
        ),
    )
    return report
