"""How a normalization layer's statistics behave while training, decided in one place.

Three users ask the same question of every norm layer: the launch check and the trainer
refuse BatchNorm statistics that each process would train on its own (a multi-process run
would normalize differently in every process and save only rank 0's statistics), and the
inference rewrites fold only norms whose statistics are fixed.
"""

from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm
from torch import nn

from .backbone.resnet import EvalBatchNorm2d

__all__ = [
    "FIXED",
    "SYNCHRONIZED",
    "PER_PROCESS",
    "batch_statistics",
    "statistics_fixed",
    "per_process_batch_norms",
]

#: Normalizes with running statistics that training never updates: FrozenBatchNorm2d, this
#: project's "BNEval", any BatchNorm in eval mode.
FIXED = "fixed"
#: Normalizes with batch statistics computed over every process: SyncBN, naiveSyncBN.
SYNCHRONIZED = "synchronized"
#: Normalizes with the batch statistics of its own process: plain BatchNorm in training mode.
PER_PROCESS = "per-process"


def batch_statistics(module: nn.Module):
    """:data:`FIXED`, :data:`SYNCHRONIZED` or :data:`PER_PROCESS` for a batch norm in its
    current mode; None for anything else (GroupNorm, LayerNorm: no batch statistics)."""
    if isinstance(module, FrozenBatchNorm2d):
        return FIXED
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return None
    has_running = module.track_running_stats and module.running_var is not None
    if has_running and (isinstance(module, EvalBatchNorm2d) or not module.training):
        return FIXED
    if isinstance(module, (nn.SyncBatchNorm, NaiveSyncBatchNorm)):
        return SYNCHRONIZED
    return PER_PROCESS


def statistics_fixed(module: nn.Module) -> bool:
    """Whether ``module`` is a batch norm with fixed statistics: an affine map that can be folded
    into the convolution before it."""
    return batch_statistics(module) == FIXED


def per_process_batch_norms(model: nn.Module):
    """Names of the batch norms of ``model`` (in its current mode) whose statistics each process
    would train on its own."""
    return [name for name, m in model.named_modules() if batch_statistics(m) == PER_PROCESS]
