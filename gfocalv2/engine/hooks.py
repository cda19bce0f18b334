"""Training-loop guards: a non-finite-loss check that runs before the backward pass and the
optimizer update, and a hook that keeps the data seed in checkpoints.

Detectron2 0.6's ``SimpleTrainer.run_step`` checks the losses in ``_write_metrics``, after
``backward()`` (newer versions may write metrics asynchronously, after ``optimizer.step()``),
and its error names neither the batch nor a checkpoint. :class:`LossGuard` wraps the model
called by the inner trainer: the losses are checked as soon as the model returns them, on
every rank (one all-reduce of a flag), so no update is ever made from a non-finite loss,
and :class:`NonFiniteLossError` names the iteration, every loss term and the batch's images.
"""
import logging

import torch
import torch.distributed as dist

from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["NonFiniteLossError", "LossGuard", "DataSeedHook", "describe_batch"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the iteration, losses and images."""

    def __init__(self, message, iteration=None, losses=None, images=None):
        super().__init__(message)
        self.iteration = iteration
        self.losses = losses or {}
        self.images = images or []

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def describe_batch(data, limit=16):
    """``["image_id 3 (path/a.jpg)", ...]`` for a list of dataset dicts."""
    out = []
    if not isinstance(data, (list, tuple)):
        return out
    for d in data[:limit]:
        if isinstance(d, dict):
            out.append(f"image_id {d.get('image_id', '?')} ({d.get('file_name', 'no file_name')})")
    if len(data) > limit:
        out.append(f"... {len(data) - limit} more")
    return out


def _all_finite(losses):
    values = [v.detach().float().sum() for v in losses.values() if isinstance(v, torch.Tensor)]
    if not values:
        return True
    ok = torch.isfinite(torch.stack(values)).all()
    if comm.get_world_size() > 1 and dist.is_available() and dist.is_initialized():
        bad = (~ok).to(torch.int32).reshape(1)
        dist.all_reduce(bad)  # every rank stops, not only the one that saw it
        return bool(bad.item() == 0)
    return bool(ok.item())


class LossGuard:
    """Stands in for the model inside Detectron2's ``SimpleTrainer``/``AMPTrainer``.

    Calls the model, and raises :class:`NonFiniteLossError` before the trainer runs
    ``backward()`` if a loss is NaN/inf. ``returned`` tells whether the current step got past
    the forward pass (so a failure before it leaves the weights of the previous iteration).
    Every other attribute is the model's.
    """

    def __init__(self, model, get_iteration):
        self.__dict__["_model"] = model
        self.__dict__["_get_iteration"] = get_iteration
        self.__dict__["returned"] = False
        self.__dict__["last_batch"] = []

    @property
    def module(self):
        return self._model

    def __getattr__(self, name):
        return getattr(self.__dict__["_model"], name)

    def __setattr__(self, name, value):
        if name in self.__dict__:
            self.__dict__[name] = value
        else:
            setattr(self._model, name, value)

    def begin_step(self):
        self.__dict__["returned"] = False

    def __call__(self, data, *args, **kwargs):
        self.__dict__["last_batch"] = describe_batch(data)  # image ids + files of the current step
        loss_dict = self._model(data, *args, **kwargs)
        if not self._model.training:  # inference outputs, not losses
            return loss_dict
        losses = loss_dict if isinstance(loss_dict, dict) else {"total_loss": loss_dict}
        if not _all_finite(losses):
            it = self._get_iteration()
            values = {k: float(v.detach().float().sum()) for k, v in losses.items() if isinstance(v, torch.Tensor)}
            images = self.last_batch
            terms = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
            raise NonFiniteLossError(
                f"Non-finite loss at iteration {it}: {terms}. Batch: {'; '.join(images) or '(unknown)'}.",
                iteration=it, losses=values, images=images,
            )
        self.__dict__["returned"] = True
        return loss_dict


class DataSeedHook(HookBase):
    """Keeps the training data seed in the trainer's checkpoint state, so that a resumed
    run continues the same data order even when ``SEED`` is -1 (random)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def state_dict(self):
        return {"data_seed": int(self.sampler.seed)}

    def load_state_dict(self, state):
        if "data_seed" in state:
            self.sampler.set_seed(state["data_seed"])
