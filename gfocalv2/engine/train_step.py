"""One guarded training step, run by Detectron2's own ``SimpleTrainer.run_step`` /
``AMPTrainer.run_step``: the model the inner trainer calls is a :class:`GuardedModel`,
and the optimizer carries a step pre-hook (:func:`check_gradients_before_update`).

* The loss check. Detectron2 0.6's ``run_step`` checks the losses in ``_write_metrics``,
  after ``backward()`` (newer versions may write metrics asynchronously, after
  ``optimizer.step()``), and its error names neither the batch nor a checkpoint.
  :class:`GuardedModel` checks the losses as soon as the model returns them, on every process
  (one all-reduce of two flags, which also carries "a process was asked to stop"), so no
  update is ever made from a non-finite loss, and :class:`NonFiniteLossError` names the
  iteration, every loss term and the batch's images.
* The gradient check. A finite loss can still give inf/NaN gradients (an exploding step)
  that would make every weight NaN: the optimizer's step pre-hook refuses them before the
  update. (Under CUDA AMP, ``GradScaler`` skips ``step()`` itself when gradients overflow.)
* CPU autocast. Detectron2's ``AMPTrainer`` requires CUDA (float16 with a gradient scaler);
  with ``SOLVER.AMP.ENABLED`` on a CPU the forward pass and the losses run under bfloat16
  autocast instead (bfloat16 has float32's exponent range: no loss scaling is needed; the
  model computes its losses in float32 either way).
"""

import contextlib
import logging

import torch
import torch.distributed as dist
from detectron2.utils import comm

__all__ = [
    "NonFiniteLossError",
    "GuardedModel",
    "check_gradients_before_update",
    "all_finite_tensors",
    "describe_batch",
]

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


def all_finite_tensors(tensors):
    """True if every tensor of the list has only finite values (one synchronization)."""
    tensors = [t for t in tensors if t is not None and t.is_floating_point() and t.numel()]
    if not tensors:
        return True
    try:
        norms = torch._foreach_norm([t.detach() for t in tensors])
    except (RuntimeError, AttributeError, TypeError):  # mixed devices/dtypes, sparse: one by one
        norms = [t.detach().float().norm() for t in tensors]
    device = norms[0].device
    return bool(torch.isfinite(torch.stack([n.float().to(device) for n in norms])).all().item())


def _agree_on_step(losses, stop_requested):
    """``(all losses finite on every rank, some rank asked to stop)``: one all-reduce of two
    flags with several processes, so every rank takes the same decision at the same step."""
    values = [v.detach().float().sum() for v in losses.values() if isinstance(v, torch.Tensor)]
    finite = torch.isfinite(torch.stack(values)).all() if values else torch.tensor(True)
    if comm.get_world_size() > 1 and dist.is_available() and dist.is_initialized():
        stop = torch.tensor(int(stop_requested), dtype=torch.int32, device=finite.device)
        flags = torch.stack([(~finite).to(torch.int32), stop])
        dist.all_reduce(flags)  # every rank stops, not only the one that saw it
        bad, stop = flags.tolist()
        return bad == 0, stop > 0
    return bool(finite.item()), bool(stop_requested)


class GuardedModel:
    """Stands in for the model inside Detectron2's ``SimpleTrainer``/``AMPTrainer``.

    Calls the model (under CPU bfloat16 autocast when ``cpu_autocast``), then raises
    :class:`NonFiniteLossError` before the trainer runs ``backward()`` if a loss is NaN/inf on
    any process. The same all-reduce tells every process whether any of them was asked to stop
    (``stop_requested()``, e.g. after SIGTERM): ``stop_agreed``. ``returned`` tells whether the
    current step got past the forward pass (a failure before it leaves the weights of the
    previous iteration), ``restore_buffers()`` undoes the BatchNorm statistics updates of a
    failed step's forward pass. Every other attribute is the model's.

    Args:
        model: the (possibly DistributedDataParallel) model.
        get_iteration: ``() -> int``, the current iteration, for messages.
        stop_requested: ``() -> bool``, whether this process was asked to stop.
        cpu_autocast: run the forward pass under ``torch.autocast("cpu", torch.bfloat16)``.
    """

    def __init__(self, model, get_iteration, stop_requested=lambda: False, cpu_autocast=False):
        state = self.__dict__
        state["_model"] = model
        state["_get_iteration"] = get_iteration
        state["_stop_requested"] = stop_requested
        state["cpu_autocast"] = cpu_autocast
        state["stop_agreed"] = False
        state["returned"] = False
        state["buffer_snapshot"] = None
        state["last_batch"] = []
        state["last_losses"] = {}

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
                m
                for m in self._model.modules()
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

    def _forward(self, data, *args, **kwargs):
        autocast = (
            torch.autocast(device_type="cpu", dtype=torch.bfloat16)
            if self.cpu_autocast and self._model.training
            else contextlib.nullcontext()
        )
        with autocast:
            return self._model(data, *args, **kwargs)

    def __call__(self, data, *args, **kwargs):
        self.__dict__["last_batch"] = describe_batch(data)  # image ids + files of the current step
        if self._model.training:
            self._snapshot_buffers()
        try:
            loss_dict = self._forward(data, *args, **kwargs)
        except Exception as e:
            model = self._model
            weights = list(model.parameters()) + list(model.buffers())
            if model.training and not all_finite_tensors(weights):
                it = self._get_iteration()
                raise NonFiniteLossError(
                    f"The model's weights are not finite at iteration {it}: the update of an "
                    "earlier iteration diverged (finite loss and gradients, too large a step), and "
                    f"the forward pass then failed ({type(e).__name__}: {e}). Batch: "
                    f"{'; '.join(self.last_batch) or '(unknown)'}.",
                    iteration=it,
                    images=list(self.last_batch),
                ) from e
            raise
        if not self._model.training:  # inference outputs, not losses
            return loss_dict
        losses = loss_dict if isinstance(loss_dict, dict) else {"total_loss": loss_dict}
        finite, stop = _agree_on_step(losses, self._stop_requested())
        self.__dict__["stop_agreed"] = stop  # every process finishes this step, then stops
        if not finite:
            it = self._get_iteration()
            values = {
                k: float(v.detach().float().sum())
                for k, v in losses.items()
                if isinstance(v, torch.Tensor)
            }
            images = self.last_batch
            terms = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
            raise NonFiniteLossError(
                f"Non-finite loss at iteration {it}: {terms}. Batch: "
                f"{'; '.join(images) or '(unknown)'}.",
                iteration=it,
                losses=values,
                images=images,
            )
        self.__dict__["last_losses"] = {
            k: v.detach() for k, v in losses.items() if isinstance(v, torch.Tensor)
        }
        self.__dict__["returned"] = True
        return loss_dict


def check_gradients_before_update(optimizer, guarded_model, get_iteration, on_update=lambda: None):
    """Register an ``optimizer`` step pre-hook that raises :class:`NonFiniteLossError` when a
    gradient is not finite (the update is then not applied), and calls ``on_update()`` just
    before a real update. ``guarded_model`` (a :class:`GuardedModel`) gives the step's losses
    and images for the message. Returns the hook's handle (``.remove()``)."""

    def check(opt, args, kwargs):
        grads = [
            p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None
        ]
        if not all_finite_tensors(grads):
            it = get_iteration()
            values = {k: float(v.float().sum()) for k, v in guarded_model.last_losses.items()}
            terms = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
            batch = "; ".join(guarded_model.last_batch) or "(unknown)"
            raise NonFiniteLossError(
                f"Non-finite gradient at iteration {it} (the losses were finite: {terms}); the "
                f"update was not applied. Batch: {batch}.",
                iteration=it,
                losses=values,
                images=list(guarded_model.last_batch),
            )
        on_update()

    return optimizer.register_step_pre_hook(check)
