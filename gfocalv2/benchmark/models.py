"""The compared models: ours (the config's), GFL/GFocalV2 variants of it, and Detectron2's
RetinaNet and FCOS built with the same backbone (:mod:`gfocalv2.modeling.baselines`); and
the layout/inference rewrites the benchmark applies to them."""

import logging
from collections import OrderedDict
from typing import Dict, Sequence

import torch
from detectron2.modeling import build_model
from torch import nn

from ..checkpoint import load_weights
from ..modeling.baselines import detectron2_fcos, detectron2_retinanet
from ..modeling.inference_optimization import (
    optimize_for_inference,
    resolve_memory_format,
    to_channels_last,
)

__all__ = [
    "KNOWN_MODELS",
    "OUR_MODELS",
    "build_models",
    "use_channels_last",
    "apply_inference_optimizations",
]

logger = logging.getLogger("gfocalv2.benchmark")

KNOWN_MODELS = ("gfocalv2", "gfl", "retinanet", "fcos")
OUR_MODELS = ("gfocalv2", "gfl")  # this project's: --optimize ours applies to these


def _our_model(cfg, dgqp: bool) -> nn.Module:
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.GFOCAL.DGQP_ENABLED = dgqp
    return build_model(cfg)


def build_models(cfg, names: Sequence[str]) -> "OrderedDict[str, nn.Module]":
    """Models by name; "ours" is the config's own model (GFocalV2 or GFLV1 per its DGQP flag),
    loaded from ``MODEL.WEIGHTS`` if set, with the checks of
    :func:`~gfocalv2.checkpoint.load_weights`. The others get random weights; one
    that cannot be built is reported and left out."""
    ours_name = "gfocalv2" if cfg.MODEL.GFOCAL.DGQP_ENABLED else "gfl"
    models = OrderedDict()
    ours = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        load_weights(ours, cfg)
    models[ours_name] = ours
    builders = {
        "gfocalv2": lambda: _our_model(cfg, True),
        "gfl": lambda: _our_model(cfg, False),
        "retinanet": lambda: detectron2_retinanet(cfg),
        "fcos": lambda: detectron2_fcos(cfg),
    }
    for name in names:
        if name in models:
            continue
        if name not in builders:
            raise ValueError(
                f"--compare: unknown model {name!r}; choose from {', '.join(KNOWN_MODELS)}"
            )
        try:
            models[name] = builders[name]()
        except Exception as e:  # report and go on with the others
            logger.warning("could not build %s: %s: %s", name, type(e).__name__, e)
            print(f"[benchmark] {name}: not built ({type(e).__name__}: {e})", flush=True)
    return models


def use_channels_last(model: nn.Module) -> None:
    """Weights and backbone input in channels-last (NHWC) layout; convolutions keep it, so
    the whole network runs in NHWC (often faster with oneDNN on CPU and tensor cores)."""
    to_channels_last(model)
    model.backbone.register_forward_pre_hook(
        lambda module, inputs: tuple(
            x.contiguous(memory_format=torch.channels_last) for x in inputs
        )
    )


def apply_inference_optimizations(
    models: "OrderedDict[str, nn.Module]", cfg, mode: str
) -> Dict[str, str]:
    """``--optimize``: "ours" optimizes this project's models (GFocalV2, GFL) as ``cfg.TEST``
    says, "all" every model the same way, "none" nothing. Returns a description per model."""
    if mode not in ("ours", "all", "none"):
        raise ValueError(f"--optimize must be ours, all or none, got {mode!r}")
    done = {}
    for name, model in models.items():
        if mode == "all" or (mode == "ours" and name in OUR_MODELS):
            optimize_for_inference(model, cfg)
            fmt = resolve_memory_format(cfg.TEST.MEMORY_FORMAT, cfg.MODEL.DEVICE)
            done[name] = f"fold BN {cfg.TEST.FOLD_BATCHNORM}, {fmt}"
        else:
            done[name] = "as built"
    return done
