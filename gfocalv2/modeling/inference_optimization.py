"""Exact rewrites that make a trained detector faster at inference.

* :func:`fold_batchnorm`: a convolution followed by a BatchNorm that normalizes with fixed
  statistics (``FrozenBatchNorm2d``, this project's ``BNEval``, any BatchNorm in eval
  mode) is one affine map; folding the norm into the convolution's weight and bias saves
  a full read and write of every backbone activation. Outputs change only by float
  rounding (relative 1e-6 in float32).
* :func:`to_channels_last`: weights in channels-last (NHWC) memory format. A convolution
  with an NHWC weight produces NHWC output, so from the first convolution on the whole
  network runs in NHWC, which oneDNN (CPU) computes without layout reorders. Values are
  unchanged; only the memory layout differs.

:func:`optimize_for_inference` applies both as ``cfg.TEST.FOLD_BATCHNORM`` and
``cfg.TEST.MEMORY_FORMAT`` say. The predictor, the demo, the exporter, evaluation
(``Trainer.test``, which works on a copy so the training model is untouched) and the
benchmark use it. A folded model's state dict has no ``*.norm.*`` entries for the folded
norms and a ``bias`` for their convolutions: load weights *before* optimizing, and do
not train or save an optimized model.

The GroupNorm of the GFocal head normalizes with statistics of its input, so it cannot be
folded; the head is only affected by the memory format.
"""

import copy
import logging

import torch
from detectron2.layers import Conv2d
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .backbone.resnet import DeformConv2d
from .norms import statistics_fixed

__all__ = [
    "fold_batchnorm",
    "to_channels_last",
    "resolve_memory_format",
    "optimize_for_inference",
    "optimized_copy",
    "has_folded_batchnorm",
]

logger = logging.getLogger(__name__)

MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
#: Set on every convolution that absorbed its norm; checkpointers refuse such models.
FOLDED_ATTR = "batchnorm_folded"


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold fixed-statistics BatchNorms into the convolution before them, in place (with
    PyTorch's ``fuse_conv_bn_weights``).

    Handles Detectron2's ``Conv2d`` and :class:`DeformConv2d` (the convolutions that carry
    their norm as ``.norm``, applied right after the convolution and before the
    activation), and a plain convolution followed by its norm in an ``nn.Sequential``. The
    BatchNorms inside timm's own blocks stay (onnxruntime folds them in an exported graph).
    Returns the number of folded norms. The model must be in eval mode.
    """
    if model.training:
        raise ValueError(
            "fold_batchnorm changes the model for inference only: call model.eval() first"
        )
    folded = 0
    for module in model.modules():
        if not isinstance(module, (Conv2d, DeformConv2d)) or module.norm is None:
            continue
        if not statistics_fixed(module.norm):
            continue
        norm = module.norm
        module.weight, module.bias = fuse_conv_bn_weights(
            module.weight,
            module.bias,
            norm.running_mean,
            norm.running_var,
            norm.eps,
            norm.weight,
            norm.bias,
        )
        module.norm = None
        setattr(module, FOLDED_ATTR, True)
        folded += 1
    return folded + _fold_sequential_batchnorm(model)


def _plain_conv(module: nn.Module) -> bool:
    """A convolution whose output is exactly ``conv2d(x, weight, bias)``: ``nn.Conv2d`` itself or
    Detectron2's ``Conv2d`` without its own norm and activation (not subclasses that transform
    their weight in ``forward``, such as weight-standardized convolutions)."""
    if type(module) is Conv2d:
        return module.norm is None and module.activation is None
    return type(module) is nn.Conv2d


def _fold_sequential_batchnorm(model: nn.Module) -> int:
    """Fold the fixed-statistics BatchNorms that directly follow a plain convolution inside an
    ``nn.Sequential`` (the GFocal head's towers with a BatchNorm, downsampling shortcuts), where
    the order of the children is the order of execution. A norm fused with its activation
    (timm's ``BatchNormAct2d``: norm, dropout, activation) leaves its dropout and activation."""
    folded = 0
    for sequence in list(model.modules()):
        if not isinstance(sequence, nn.Sequential):
            continue
        children = list(sequence._modules.items())
        for (_, conv), (name, norm) in zip(children, children[1:]):
            if not (_plain_conv(conv) and statistics_fixed(norm)) or type(norm) is nn.Identity:
                continue
            conv.weight, conv.bias = fuse_conv_bn_weights(
                conv.weight,
                conv.bias,
                norm.running_mean,
                norm.running_var,
                norm.eps,
                norm.weight,
                norm.bias,
            )
            rest = [getattr(norm, a) for a in ("drop", "act") if getattr(norm, a, None) is not None]
            sequence._modules[name] = nn.Sequential(*rest) if rest else nn.Identity()
            setattr(conv, FOLDED_ATTR, True)
            folded += 1
    return folded


def has_folded_batchnorm(model: nn.Module) -> bool:
    """Whether :func:`fold_batchnorm` changed ``model`` (its parameters no longer match
    checkpoints)."""
    return any(getattr(m, FOLDED_ATTR, False) for m in model.modules())


def to_channels_last(model: nn.Module) -> nn.Module:
    """Every 4-d parameter and buffer in channels-last memory format, in place."""
    return model.to(memory_format=torch.channels_last)


def resolve_memory_format(memory_format: str, device) -> str:
    """ "auto" -> "channels_last" on CPU, "contiguous" on other devices (not measured there)."""
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(
            f"TEST.MEMORY_FORMAT must be one of {MEMORY_FORMATS}, got {memory_format!r}"
        )
    if memory_format == "auto":
        return "channels_last" if torch.device(device).type == "cpu" else "contiguous"
    return memory_format


def optimize_for_inference(model: nn.Module, cfg, memory_format=None) -> nn.Module:
    """Apply ``cfg.TEST.FOLD_BATCHNORM`` and ``cfg.TEST.MEMORY_FORMAT`` (or ``memory_format``,
    when given) to ``model``, in place; puts it in eval mode and returns it."""
    model.eval()
    if cfg.TEST.FOLD_BATCHNORM:
        n = fold_batchnorm(model)
        logger.debug("Folded %d BatchNorms into their convolutions", n)
    if memory_format is None:
        memory_format = cfg.TEST.MEMORY_FORMAT
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if resolve_memory_format(memory_format, device) == "channels_last":
        to_channels_last(model)
    return model


def optimized_copy(model: nn.Module, cfg) -> nn.Module:
    """An optimized copy of ``model`` (unwrapped from DistributedDataParallel) for evaluation
    during or after training; ``model`` itself is left as it is."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    if not (cfg.TEST.FOLD_BATCHNORM or cfg.TEST.MEMORY_FORMAT != "contiguous"):
        return model
    duplicate = copy.deepcopy(model)
    for p in duplicate.parameters():  # gradients of the training step are not needed (memory)
        p.grad = None
    return optimize_for_inference(duplicate, cfg)
