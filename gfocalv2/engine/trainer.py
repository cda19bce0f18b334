"""``Trainer``: Detectron2's ``DefaultTrainer`` for GFocalV2.

Detectron2 builds and runs everything: model (wrapped in ``DistributedDataParallel`` with
several processes), optimizer, LR schedule, ``SimpleTrainer``/``AMPTrainer.run_step``,
periodic checkpoints, evaluation every ``TEST.EVAL_PERIOD`` and after the last iteration,
``metrics.json``, TensorBoard events and the console log. What this class changes, override
by override, each for one reason:

* ``__init__``: a multi-process run with BatchNorm statistics trained per process is refused
  (the rule of :mod:`gfocalv2.modeling.norms`; ``train_net.py`` checks it before any process
  starts, this catches other ways of starting processes). With ``SOLVER.AMP.ENABLED`` on a
  CPU, Detectron2's ``AMPTrainer`` (CUDA float16 with a gradient scaler) cannot run; the
  training forward pass runs under bfloat16 autocast instead, through ``SimpleTrainer``. The
  test sets are checked at start-up, not at the first evaluation hours later.
* ``build_optimizer``: ``SOLVER.OPTIMIZER`` "AdamW" (the ConvNeXt/Swin recipes) gives
  ``torch.optim.AdamW`` over Detectron2's parameter groups, with its gradient clipping;
  Detectron2 builds SGD only. "SGD" (the default) is Detectron2's, unchanged.
* ``build_train_loader`` / ``build_test_loader``: the loaders of :mod:`gfocalv2.data.loader`
  (checked datasets, unreadable images skipped, a data order that resumes bit for bit).
* ``build_hooks``: the checkpointer is :class:`~gfocalv2.checkpoint.GFocalCheckpointer`
  (atomic writes, checked loads); :class:`~gfocalv2.engine.hooks.DataSeedHook` saves the data
  seed; :class:`~gfocalv2.engine.hooks.StopOnSignal` stops on SIGTERM/SIGINT.
* ``build_evaluator`` / ``test``: ``COCOEvaluator`` (a model that predicts nothing gets AP 0),
  on an optimized copy of the model (``TEST.FOLD_BATCHNORM``, ``TEST.MEMORY_FORMAT``).
* ``test_with_TTA`` (Detectron2's ``tools/train_net.py`` has it for R-CNN): evaluation with
  test-time augmentation (``TEST.AUG``, :mod:`gfocalv2.test_time_augmentation`); with
  ``TEST.AUG.ENABLED`` ``build_hooks`` adds it after the last iteration, as that script does.
* ``resume_or_load``, ``state_dict``, ``load_state_dict``: the data order continues at the
  resumed iteration, and the optimizer state is saved with Detectron2 0.6 too (its
  ``DefaultTrainer`` does not), so a resumed run is bit for bit the uninterrupted one.
* ``run_step`` / ``after_step`` / ``after_train``: when an iteration fails (a non-finite loss,
  which Detectron2's ``_write_metrics`` reports as ``FloatingPointError``; data loading; an
  evaluation), rank 0 saves the last good state and the error says where; a failed or
  interrupted run neither evaluates nor writes ``model_final``. :meth:`interrupt` ends a run
  stopped by a signal (exit status 143 or 130).
"""

import contextlib
import logging
import os
import signal
import weakref
from collections import OrderedDict

import torch
from detectron2.engine import DefaultTrainer, hooks
from detectron2.engine.train_loop import TrainerBase
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm

from ..checkpoint import NonFiniteWeightsError, checkpointer_for
from ..config_checks import check_optimizer
from ..data.datasets import check_datasets_registered, check_num_classes
from ..data.loader import build_checked_test_loader, build_resumable_train_loader
from ..evaluation import build_coco_evaluator
from ..modeling.inference_optimization import optimized_copy
from ..test_time_augmentation import GFocalV2WithTTA, original_size_inputs
from .hooks import DataSeedHook, StopOnSignal
from .launch import check_batch_norm

__all__ = ["Trainer", "TrainingInterrupted", "NonFiniteLossError"]

logger = logging.getLogger(__name__)


class TrainingInterrupted(SystemExit):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint: a ``SystemExit`` with the
    conventional status 128 + signal number (143, 130), so scripts exit with it and without a
    traceback; ``str()`` says where the state is."""

    def __init__(self, signum, message):
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.message = message

    def __str__(self):
        return self.message


class NonFiniteLossError(FloatingPointError):
    """Detectron2's non-finite loss error at ``iteration``, with the batch and the saved state
    named."""

    def __init__(self, message, iteration):
        super().__init__(message)
        self.iteration = iteration


def _with_amp(cfg, enabled):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.AMP.ENABLED = enabled
    cfg.freeze()
    return cfg


def autocast_training_forward(model, dtype=torch.bfloat16):
    """Run ``model``'s training forward passes (and the losses, which the model computes in
    float32 itself) under CPU autocast: forward hooks, so that Detectron2's ``run_step`` calls
    the model as it is. bfloat16 has float32's exponent range: no gradient scaling is needed."""
    contexts = []

    def enter(module, args):
        if module.training:
            contexts.append(torch.autocast(device_type="cpu", dtype=dtype))
            contexts[-1].__enter__()

    def leave(module, args, output):
        if contexts:
            contexts.pop().__exit__(None, None, None)

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)


def describe_batch(batch, limit=8):
    """``image_id N (file)`` for the first ``limit`` images of a batch of dataset dicts."""
    described = [f"image_id {d.get('image_id', '?')} ({d.get('file_name', '?')})" for d in batch]
    return described[:limit] + ([f"... {len(batch) - limit} more"] if len(batch) > limit else [])


class Trainer(DefaultTrainer):
    """See the module docstring."""

    def __init__(self, cfg):
        cpu_amp = cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda")
        self._failed = False  # a step or hook failed: after_train neither evaluates nor saves
        self._stop_on_signal = StopOnSignal(cfg.SOLVER.STOP_CHECK_PERIOD)
        # The stop-signal handlers end with the training loop (train()). With several processes
        # they start here: the launcher forwards a stop signal to every process, and one that
        # arrived while this process was still being built would end it alone, its peers
        # failing in their next collective; recorded, it stops all of them after an iteration.
        self._signals = contextlib.ExitStack()
        if comm.get_world_size() > 1:
            self._signals.enter_context(self._stop_on_signal.signals_recorded())
        try:
            super().__init__(_with_amp(cfg, False) if cpu_amp else cfg)
        except BaseException:
            self._signals.close()
            raise
        model = self.model.module if hasattr(self.model, "module") else self.model
        check_batch_norm(model, self.cfg, comm.get_world_size())
        if cpu_amp:
            self.cfg = _with_amp(self.cfg, True)
            autocast_training_forward(model)
        # Whether the current iteration has changed the weights: the last good state of a failed
        # iteration is the one before it, or after it once the optimizer has stepped.
        self._updated_iter = -1
        self.optimizer.register_step_post_hook(lambda *_: setattr(self, "_updated_iter", self.iter))
        for name in self.cfg.DATASETS.TEST:  # loads and checks the test sets
            self.build_test_loader(self.cfg, name)

    # ------------------------------------------------------------------ set-up
    def build_hooks(self):
        self.checkpointer = checkpointer_for(
            self.cfg, self.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        hook_list = super().build_hooks()
        # After the periodic checkpointer (whose file a stop then reuses), before evaluation
        # (a preempted run should not start one).
        at = next(
            (i for i, h in enumerate(hook_list) if isinstance(h, hooks.EvalHook)), len(hook_list)
        )
        hook_list.insert(at, self._stop_on_signal)
        hook_list.append(DataSeedHook(self.data_loader))
        if self.cfg.TEST.AUG.ENABLED:
            # The final evaluation with TTA, as tools/train_net.py; before the writers (which
            # Detectron2 runs last so that they write the evaluation's metrics), so that its
            # metrics reach metrics.json too.
            at = next(
                (i for i, h in enumerate(hook_list) if isinstance(h, hooks.PeriodicWriter)),
                len(hook_list),
            )
            tta = hooks.EvalHook(0, lambda: self.test_with_TTA(self.cfg, self.model))
            hook_list.insert(at, tta)
        return hook_list

    @classmethod
    def build_optimizer(cls, cfg, model):
        """Detectron2's SGD; with ``SOLVER.OPTIMIZER`` "AdamW", ``torch.optim.AdamW`` (betas
        ``SOLVER.BETAS``) over the parameter groups Detectron2 gives SGD, with the same
        ``SOLVER.CLIP_GRADIENTS``."""
        if check_optimizer(cfg, "Trainer.build_optimizer") == "SGD":
            return super().build_optimizer(cfg, model)
        # the arguments of Detectron2's build_optimizer, by keyword (main added one before
        # `overrides`); no weight_decay: the optimizer's default, as for SGD
        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        )
        return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(
            params,
            lr=cfg.SOLVER.BASE_LR,
            betas=tuple(cfg.SOLVER.BETAS),
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )

    @classmethod
    def build_train_loader(cls, cfg):
        check_datasets_registered(cfg)
        loader = build_resumable_train_loader(cfg)
        for name in cfg.DATASETS.TRAIN:  # thing_classes are known once the json is loaded
            check_num_classes(cfg, name)
        return loader

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        check_datasets_registered(cfg)
        loader = build_checked_test_loader(cfg, dataset_name)
        check_num_classes(cfg, dataset_name)
        return loader

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_coco_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate an optimized copy of ``model`` (BatchNorms folded, ``TEST.MEMORY_FORMAT``):
        the same detections up to float rounding, faster; the training model is left as it is."""
        return super().test(cfg, optimized_copy(model, cfg), evaluators)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluate ``model`` with test-time augmentation (``TEST.AUG``) on ``DATASETS.TEST``, as
        Detectron2's ``tools/train_net.py``: results keyed ``<dataset>_TTA``, files in
        ``OUTPUT_DIR/inference_TTA``. The test loader gives the images at their own size (every
        view is resized from the original, not from the plain test resize)."""
        tta = GFocalV2WithTTA(cfg, optimized_copy(model, cfg))
        logger.info("Running inference with test-time augmentation: %s", tta)
        folder = os.path.join(cfg.OUTPUT_DIR, "inference_TTA")
        evaluators = [cls.build_evaluator(cfg, name, folder) for name in cfg.DATASETS.TEST]
        results = super().test(original_size_inputs(cfg), tta, evaluators)
        return OrderedDict((name + "_TTA", value) for name, value in results.items())

    # ------------------------------------------------------------------ resume
    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        # before the loader's first batch (it starts lazily)
        self.data_loader.set_start_iter(self.start_iter)
        if self.start_iter:
            logger.info(
                "Training data resumes at iteration %d (seed %d)",
                self.start_iter,
                self.data_loader.seed,
            )

    def state_dict(self):
        # Detectron2 0.6's DefaultTrainer saves neither the optimizer nor the AMP grad scaler
        # (later versions do, under "_trainer"): without them a resumed run restarts SGD
        # momentum (AdamW moments) from zero and diverges from the uninterrupted run.
        ret = super().state_dict()
        ret.setdefault("_trainer", self._trainer.state_dict())
        return ret

    def load_state_dict(self, state_dict):
        if "_trainer" in state_dict:
            super().load_state_dict(state_dict)
            self._trainer.load_state_dict(state_dict["_trainer"])  # v0.6 does not
        else:  # later versions read "_trainer" unconditionally (KeyError)
            TrainerBase.load_state_dict(self, state_dict)
            logger.warning(
                "The checkpoint has no optimizer state (written by Detectron2's DefaultTrainer "
                "0.6?): SGD momentum (AdamW moments) restarts from zero"
            )

    # ------------------------------------------------------------ on failure
    def train(self):
        with self._signals:  # the handlers installed in __init__ (several processes) end here
            if comm.get_world_size() == 1:  # from the first log line of training on
                self._signals.enter_context(self._stop_on_signal.signals_recorded())
            return super().train()

    def run_step(self):
        try:
            super().run_step()
        except BaseException as e:
            error = self._failure(e)
            if error is e:
                raise
            raise error from e

    def after_step(self):
        try:
            super().after_step()
        except TrainingInterrupted:
            raise
        except BaseException as e:
            self._failure(e)
            raise

    def after_train(self):
        if not self._failed:
            return super().after_train()
        # Detectron2's EvalHook and PeriodicCheckpointer would evaluate and write model_final
        # after a failure in the last iteration, and their processes may be gone.
        self.storage.iter = self.iter
        for hook in self._hooks:
            if not isinstance(hook, (hooks.EvalHook, hooks.PeriodicCheckpointer)):
                hook.after_train()

    def _failure(self, error):
        """After ``error`` in the current iteration: mark the run failed; on rank 0, for an
        ``Exception``, save the last good state; return the error to raise (a non-finite loss
        becomes :class:`NonFiniteLossError`, naming the batch and the saved state)."""
        self._failed = True
        if not isinstance(error, Exception):  # KeyboardInterrupt (a second Ctrl-C), SystemExit
            return error
        done = self.iter if self._updated_iter == self.iter else self.iter - 1
        saved = self._save_state(done, "the last good state")
        if isinstance(error, FloatingPointError) and not isinstance(error, NonFiniteWeightsError):
            batch = "; ".join(describe_batch(getattr(self.data_loader, "last_batch", None) or []))
            return NonFiniteLossError(
                f"{error} Batch: {batch or '(unknown)'}. {saved} To continue: lower "
                "SOLVER.BASE_LR, lengthen SOLVER.WARMUP_ITERS or enable SOLVER.CLIP_GRADIENTS "
                "(and check these images' annotations), then run again with --resume.",
                self.iter,
            )
        if saved:
            logger.error("Iteration %d failed (%s). %s", self.iter, type(error).__name__, saved)
        return error

    def interrupt(self, signum):
        """End the run after this iteration on ``signum`` (every process calls it after the same
        iteration): rank 0 saves, every process waits for that, then :class:`TrainingInterrupted`
        (no evaluation, no ``model_final``)."""
        self._failed = True
        saved = self._save_state(self.iter, "the state at the interruption")
        comm.synchronize()  # no process exits (and gets its peers terminated) before the save
        message = (
            f"Training stopped after iteration {self.iter} on {signal.Signals(signum).name}. "
            f"{saved or 'The main process saved the state.'} Continue with --resume."
        )
        logger.warning(message)
        raise TrainingInterrupted(signum, message)

    def _save_state(self, iteration, what):
        """On rank 0, save the current state as the checkpoint of ``iteration`` (unless one
        exists); returns a sentence saying where ("" on the other ranks)."""
        if not comm.is_main_process():
            return ""
        if iteration < self.start_iter:
            return "Nothing was trained in this run; the last checkpoint (if any) is unchanged."
        name = f"model_{iteration:07d}"
        path = os.path.join(self.checkpointer.save_dir, name + ".pth")
        if os.path.isfile(path):
            return f"The state after iteration {iteration} is {path}."
        current = self.iter
        self.iter = iteration  # the trainer state records the iteration that has finished
        try:
            self.checkpointer.save(name, iteration=iteration)
        except NonFiniteWeightsError as err:  # the message names the last good checkpoint
            return str(err)
        except Exception as err:  # noqa: BLE001  (never hide the original error)
            logger.error("Could not save %s to %s: %s", what, path, err)
            return f"Saving the state after iteration {iteration} to {path} failed ({err})."
        finally:
            self.iter = current
        logger.warning("Saved %s (after iteration %d) to %s", what, iteration, path)
        return f"The state after iteration {iteration} was saved to {path}."
