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

__all__ = ["NonFiniteLossError", "LossGuard", "guard_optimizer_step", "all_finite_tensors", "DataSeedHook", "describe_batch"]

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


def _agree_on_step(losses, stop_requested):
    """``(all losses finite on every rank, some rank asked to stop)``: one all-reduce of two flags
    with several processes, so every rank takes the same decision at the same step."""
    values = [v.detach().float().sum() for v in losses.values() if isinstance(v, torch.Tensor)]
    finite = torch.isfinite(torch.stack(values)).all() if values else torch.tensor(True)
    if comm.get_world_size() > 1 and dist.is_available() and dist.is_initialized():
        flags = torch.stack([(~finite).to(torch.int32), torch.tensor(int(stop_requested), dtype=torch.int32,
                                                                      device=finite.device)])
        dist.all_reduce(flags)  # every rank stops, not only the one that saw it
        bad, stop = flags.tolist()
        return bad == 0, stop > 0
    return bool(finite.item()), bool(stop_requested)


class LossGuard:
    """Stands in for the model inside Detectron2's ``SimpleTrainer``/``AMPTrainer``.

    Calls the model, and raises :class:`NonFiniteLossError` before the trainer runs
    ``backward()`` if a loss is NaN/inf on any rank. The same all-reduce tells every rank whether
    any of them was asked to stop (``stop_requested()``, e.g. after SIGTERM): ``stop_agreed``. ``returned`` tells whether the current step got past
    the forward pass (so a failure before it leaves the weights of the previous iteration).
    Every other attribute is the model's.
    """

    def __init__(self, model, get_iteration, stop_requested=lambda: False):
        self.__dict__["_model"] = model
        self.__dict__["_get_iteration"] = get_iteration
        self.__dict__["_stop_requested"] = stop_requested
        self.__dict__["stop_agreed"] = False
        self.__dict__["returned"] = False
        self.__dict__["buffer_snapshot"] = None
        self.__dict__["last_batch"] = []
        self.__dict__["last_losses"] = {}

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
        self.__dict__["buffer_snapshot"] = None

    def _running_stat_modules(self):
        mods = self.__dict__.get("_bn_modules")
        if mods is None:
            mods = [
                m for m in self._model.modules()
                if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats
            ]
            self.__dict__["_bn_modules"] = mods
        return mods

    def _snapshot_buffers(self):
        # A training forward updates BatchNorm running statistics: keep them (they are small)
        # so that a failed step can be undone completely (see restore_buffers).
        snap = []
        for m in self._running_stat_modules():
            if m.training:
                for name in ("running_mean", "running_var", "num_batches_tracked"):
                    b = getattr(m, name, None)
                    if b is not None:
                        snap.append((b, b.detach().clone()))
        self.__dict__["buffer_snapshot"] = snap

    def restore_buffers(self):
        """Undo the running-statistics updates of the current step's forward pass (if any)."""
        snap = self.__dict__.get("buffer_snapshot")
        if snap:
            with torch.no_grad():
                for b, saved in snap:
                    b.copy_(saved)
        self.__dict__["buffer_snapshot"] = None

    def __call__(self, data, *args, **kwargs):
        self.__dict__["last_batch"] = describe_batch(data)  # image ids + files of the current step
        if self._model.training:
            self._snapshot_buffers()
        try:
            loss_dict = self._model(data, *args, **kwargs)
        except Exception as e:
            model = self._model
            if model.training and not all_finite_tensors(list(model.parameters()) + list(model.buffers())):
                it = self._get_iteration()
                raise NonFiniteLossError(
                    f"The model's weights are not finite at iteration {it}: the update of an earlier iteration "
                    f"diverged (finite loss and gradients, too large a step), and the forward pass then failed "
                    f"({type(e).__name__}: {e}). Batch: {'; '.join(self.last_batch) or '(unknown)'}.",
                    iteration=it, images=list(self.last_batch),
                ) from e
            raise
        if not self._model.training:  # inference outputs, not losses
            return loss_dict
        losses = loss_dict if isinstance(loss_dict, dict) else {"total_loss": loss_dict}
        finite, stop = _agree_on_step(losses, self._stop_requested())
        self.__dict__["stop_agreed"] = stop  # every rank finishes this step, then stops (see reliability)
        if not finite:
            it = self._get_iteration()
            values = {k: float(v.detach().float().sum()) for k, v in losses.items() if isinstance(v, torch.Tensor)}
            images = self.last_batch
            terms = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
            raise NonFiniteLossError(
                f"Non-finite loss at iteration {it}: {terms}. Batch: {'; '.join(images) or '(unknown)'}.",
                iteration=it, losses=values, images=images,
            )
        self.__dict__["last_losses"] = {k: v.detach() for k, v in losses.items() if isinstance(v, torch.Tensor)}
        self.__dict__["returned"] = True
        return loss_dict


def all_finite_tensors(tensors):
    """True if every tensor of the list has only finite values (one synchronization)."""
    tensors = [t for t in tensors if t is not None and t.is_floating_point() and t.numel()]
    if not tensors:
        return True
    try:
        norms = torch._foreach_norm([t.detach() for t in tensors])
    except (RuntimeError, AttributeError, TypeError):  # mixed devices/dtypes, sparse: one by one
        norms = [t.detach().float().norm() for t in tensors]
    return bool(torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).all().item())


def guard_optimizer_step(optimizer, on_update, get_iteration, get_guard):
    """Make ``optimizer.step()`` check that all gradients are finite first: a finite loss can
    still give inf/NaN gradients (an exploding step) that would make every weight NaN.
    Raises :class:`NonFiniteLossError` before the update; calls ``on_update()`` just before a
    real update. (Under AMP, GradScaler skips ``step()`` itself when gradients overflow.)"""
    import types

    real_step = optimizer.step

    def step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not all_finite_tensors(grads):
            guard = get_guard()
            it = get_iteration()
            values = {k: float(v.float().sum()) for k, v in guard.last_losses.items()}
            terms = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
            raise NonFiniteLossError(
                f"Non-finite gradient at iteration {it} (the losses were finite: {terms}); the update was not "
                f"applied. Batch: {'; '.join(guard.last_batch) or '(unknown)'}.",
                iteration=it, losses=values, images=list(guard.last_batch),
            )
        on_update()
        return real_step(*args, **kwargs)

    if getattr(real_step, "_wrapped_by_lr_sched", False):
        # Wrapped after the LR scheduler was built: keep torch's marker, or the scheduler's first
        # step() warns that "optimizer.step() has been overridden after learning rate scheduler
        # initialization" (the scheduler's own wrapper still runs, inside real_step).
        step._wrapped_by_lr_sched = True
    optimizer.step = types.MethodType(step, optimizer)  # bound, as LR schedulers expect to re-wrap it
    return optimizer


class DataSeedHook(HookBase):
    """Keeps the training data seed in the trainer's checkpoint state, so that a resumed
    run continues the same data order and augmentations even when ``SEED`` is -1 (random)."""

    def __init__(self, sampler, dataset=None):
        self.sampler = sampler
        self.dataset = dataset  # its augmentations are seeded from the same seed

    def state_dict(self):
        return {"data_seed": int(self.sampler.seed)}

    def load_state_dict(self, state):
        if "data_seed" in state:
            self.sampler.set_seed(state["data_seed"])
            if hasattr(self.dataset, "seed"):
                self.dataset.seed = int(state["data_seed"])
