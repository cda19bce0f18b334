"""timm classification checkpoints -> the timm backbone (``build_timm_fpn_backbone``) of a
Detectron2 checkpoint.

timm reads and renames the weights itself: the file (``.safetensors``, or a ``.pth`` / ``.bin``
state dict, plain or under ``"state_dict"`` / ``"model"`` / ``"state_dict_ema"``, the EMA
weights first, as ``timm.models.load_checkpoint`` reads it) is given to
``timm.create_model(name, pretrained=True, features_only=True,
pretrained_cfg_overlay=dict(file=src))``, which applies the model's checkpoint filter and
builds the feature extractor that :class:`~gfocalv2.modeling.backbone.timm_backbone.TimmBackbone`
holds as ``model`` (so its keys become ``backbone.bottom_up.model.*``).

timm's feature-extractor load is not strict (it drops the classifier, and some models' feature
classes drop more), so a checkpoint of another model could load partly and silently. Two
checks make it exact:

* the file is first loaded strictly into timm's classification model of ``name`` (its
  classifier sized as the checkpoint's): a missing, unexpected or differently shaped tensor
  is an error naming the file and the model;
* every tensor of the feature extractor must equal a tensor of that strictly loaded model
  (compared by content), i.e. come from the checkpoint; the checkpoint tensors the feature
  extractor has no use for (classifier, head) are reported as dropped.
"""

import hashlib
import logging
import os
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch

from .report import ConversionError, ConversionReport

logger = logging.getLogger("gfocalv2.convert")

#: Where the timm feature extractor lives in a GFocalV2 model (``build_timm_fpn_backbone``).
TIMM_PREFIX = "backbone.bottom_up.model."

_NAME_HINT = (
    "the timm model the checkpoint was saved from (a Hugging Face timm repository's "
    'config.json names it under "architecture")'
)


def _import_timm():
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is a dependency of the timm backbone
        raise ConversionError("kind timm needs timm: pip install timm") from e
    return timm


def _check_name(timm, name: Optional[str]) -> str:
    if not name:
        raise ConversionError(
            f"kind timm needs --name: {_NAME_HINT}, e.g. --name convnext_tiny; or --config-file "
            "with MODEL.TIMM.NAME set"
        )
    if not timm.is_model(name):
        from gfocalv2.modeling.backbone.timm_backbone import unknown_model_message

        raise ConversionError(unknown_model_message(timm, name, "--name"))
    return name


def read_timm_checkpoint(src: str) -> Dict[str, torch.Tensor]:
    """The state dict timm reads from ``src`` (``timm.models.load_state_dict``); errors name the
    file and what to give instead."""
    timm = _import_timm()
    if not os.path.isfile(src):
        raise ConversionError(
            f"{src} does not exist{' (it is a directory)' if os.path.isdir(src) else ''}: give "
            "the path of the timm checkpoint file (model.safetensors, pytorch_model.bin or a .pth)"
        )
    what = (
        "a timm checkpoint: a .safetensors file, or a .pth / .bin state dict (plain, or under "
        '"state_dict", "model" or "state_dict_ema")'
    )
    try:
        state = timm.models.load_state_dict(src)
    except Exception as e:  # noqa: BLE001  (pickle, zip, safetensors header errors, ...)
        raise ConversionError(
            f"{src} is not a checkpoint timm can read ({type(e).__name__}: {e}). Give {what}."
        ) from e
    if not isinstance(state, dict) or not state:
        raise ConversionError(
            f"{src}: no state dict found (got {type(state).__name__}); give {what}"
        )
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise ConversionError(
                f"{src}: value of key {k} is a {type(v).__name__}, not a tensor; give {what}"
            )
    return state


def _classifier_sizes(timm, name: str, state: Dict[str, torch.Tensor]):
    """Classifier sizes to build the classification model with: the checkpoint's (rows of the
    classifier weight that timm's pretrained config names), else none (a checkpoint without its
    head), else the model's default (a checkpoint whose classifier timm's filter renames)."""
    cfg = timm.models.get_pretrained_cfg(name)
    classifiers = getattr(cfg, "classifier", None) if cfg is not None else None
    if isinstance(classifiers, str):
        classifiers = (classifiers,)
    for c in classifiers or ():
        w = state.get(c + ".weight")
        if isinstance(w, torch.Tensor) and w.dim() >= 1:
            return [int(w.shape[0])]
    default = getattr(cfg, "num_classes", None) if cfg is not None else None
    return [0] + ([default] if default else [])


def _summarize(e: Exception, lines: int = 6, width: int = 300) -> str:
    """The first ``lines`` lines of an error (load_state_dict lists every key), each cut at
    ``width`` characters."""
    text = f"{type(e).__name__}: {e}".strip().splitlines() or [type(e).__name__]
    kept = [t if len(t) <= width else t[:width] + " ..." for t in text[:lines]]
    if len(text) > lines:
        kept.append(f"... ({len(text) - lines} more lines)")
    return "\n".join(kept)


def _create(timm, name: str, src: str, num_classes: int, **kwargs):
    # num_classes in the overlay too: timm loads strictly only when the model's classifier
    # size equals the pretrained config's; label_offset 0: the classifier rows stay as saved.
    overlay = dict(file=src, num_classes=num_classes, label_offset=0)
    return timm.create_model(
        name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay, **kwargs
    )


def _key_overlap(timm, name: str, keys) -> str:
    """How the checkpoint's tensor names compare with those of timm's model ``name``."""
    try:
        model_keys = set(timm.create_model(name).state_dict())
    except Exception:  # noqa: BLE001  (only a hint)
        return ""
    keys = set(keys)
    shared = keys & model_keys
    text = f" {len(shared)} of the file's {len(keys)} tensor names are names of {name}"
    extra, missing = sorted(keys - model_keys), sorted(model_keys - keys)
    if extra:
        text += f"; the file has e.g. {', '.join(extra[:3])}"
    if missing:
        text += f"; {name} has e.g. {', '.join(missing[:3])}"
    return text + "."


def _load_classification_model(timm, name: str, src: str, sizes, keys):
    """timm's classification model of ``name`` with ``src`` loaded strictly; returns
    (model, num_classes)."""
    errors = []
    for n in sizes:
        try:
            return _create(timm, name, src, n), n
        except Exception as e:  # noqa: BLE001  (load_state_dict's RuntimeError, filter errors)
            errors.append(e)
    raise ConversionError(
        f"{src} does not match the timm model {name!r}: timm cannot load it into that model "
        f"({_summarize(errors[0])}).{_key_overlap(timm, name, keys)} The checkpoint seems to be "
        f"for another model: pass {_NAME_HINT} as --name (and as MODEL.TIMM.NAME in the config)."
    ) from errors[0]


def _fingerprint(t: torch.Tensor):
    """Shape, dtype and a hash of the bytes: equal for equal tensors, NaNs included."""
    t = t.detach().cpu().contiguous()
    h = hashlib.blake2b(digest_size=16)
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return tuple(t.shape), str(t.dtype), h.hexdigest()


def _common_suffix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def convert_timm(
    src: str, name: str
) -> Tuple["OrderedDict[str, torch.Tensor]", ConversionReport, dict]:
    """A timm checkpoint file -> ``{backbone.bottom_up.model.*: tensor}`` for the timm backbone
    ``name``; returns (dict, report, the feature extractor's timm pretrained config)."""
    timm = _import_timm()
    name = _check_name(timm, name)
    state = read_timm_checkpoint(src)
    sizes = _classifier_sizes(timm, name, state)
    keys = list(state)
    del state
    full, num_classes = _load_classification_model(timm, name, src, sizes, keys)
    source = OrderedDict()  # fingerprint -> keys in the checkpoint (timm's names)
    for k, v in full.state_dict().items():
        source.setdefault(_fingerprint(v), []).append(k)
    del full
    try:
        features = _create(timm, name, src, num_classes, features_only=True)
    except Exception as e:  # noqa: BLE001
        raise ConversionError(
            f"timm cannot build {name!r} as a feature extractor (features_only=True) with the "
            f"weights of {src} ({_summarize(e)}). The timm backbone needs a model with feature "
            "extraction support, e.g. resnet50, convnext_tiny, efficientnet_b0, "
            "mobilenetv3_large_100, regnety_016."
        ) from e
    report = ConversionReport()
    converted = OrderedDict()
    used = set()
    for k, v in features.state_dict().items():
        target = TIMM_PREFIX + k
        converted[target] = v.detach()
        fp = _fingerprint(v)
        if fp in source:
            # equal tensors (e.g. BatchNorm step counters): name the one whose key ends alike
            report.converted.append((max(source[fp], key=lambda s: _common_suffix(s, k)), target))
            used.add(fp)
        else:
            report.missing.append(target)
    for fp, keys in source.items():
        if fp not in used:
            for k in keys:
                report.dropped.append((k, "not part of timm's feature extractor (classifier/head)"))
    report.notes.append(
        f"timm model {name} ({type(features).__name__}, feature strides "
        f"{features.feature_info.reduction()})"
    )
    return converted, report, dict(getattr(features, "pretrained_cfg", {}) or {})


def timm_target_name(name: Optional[str], config_file=None, opts=()) -> Tuple[str, object]:
    """The timm model name: ``name`` or MODEL.TIMM.NAME of ``config_file`` + ``opts`` (which must
    agree and use the timm backbone); returns (name, cfg or None)."""
    cfg = None
    if config_file:
        from .target import build_target_cfg

        try:
            cfg = build_target_cfg(None, detector=True, config_file=config_file, opts=opts)
        except (OSError, ValueError, KeyError) as e:
            raise ConversionError(f"--config-file {config_file}: {e}") from e
        backbone = cfg.MODEL.BACKBONE.NAME
        if backbone != "build_timm_fpn_backbone":
            raise ConversionError(
                f"--config-file {config_file} has MODEL.BACKBONE.NAME {backbone}; timm weights "
                "are for MODEL.BACKBONE.NAME build_timm_fpn_backbone (with MODEL.TIMM.NAME)"
            )
        cfg_name = cfg.MODEL.TIMM.NAME
        # the same architecture under another pretrained tag (convnext_tiny.fb_in1k) is fine
        if name and cfg_name and name.partition(".")[0] != cfg_name.partition(".")[0]:
            raise ConversionError(
                f"--name {name} differs from MODEL.TIMM.NAME {cfg_name} of --config-file "
                f"{config_file}: the converted weights would not load into that model"
            )
        name = name or cfg_name
        cfg.MODEL.TIMM.NAME = name or ""
    return name, cfg


def pixel_normalization(pretrained_cfg: dict):
    """(MODEL.PIXEL_MEAN, MODEL.PIXEL_STD) on the 0-255 scale of timm's mean/std, or None."""
    mean, std = pretrained_cfg.get("mean"), pretrained_cfg.get("std")
    if not mean or not std:
        return None
    return [round(255 * m, 3) for m in mean], [round(255 * s, 3) for s in std]
