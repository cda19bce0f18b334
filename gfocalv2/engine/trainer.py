"""``Trainer``: Detectron2's ``DefaultTrainer`` for GFocalV2, with explicit overrides.

Everything a Detectron2 user knows stays Detectron2's: SGD with warm-up and step schedule,
periodic checkpoints to ``OUTPUT_DIR``, evaluation every ``TEST.EVAL_PERIOD`` and after the
last iteration, ``metrics.json`` + TensorBoard events + console log with ETA,
``resume_or_load``. What this class changes, override by override:

* ``__init__``: Detectron2's (the same in v0.6 and later), except that the model is wrapped
  for several processes on CPU as on CUDA (:func:`~gfocalv2.engine.distributed.create_ddp_model`),
  a multi-process run with trained, unsynchronized BatchNorm is refused, and the inner
  trainer calls the model through a :class:`~gfocalv2.engine.train_step.GuardedModel` (loss
  check before ``backward()``, CPU bfloat16 autocast for ``SOLVER.AMP.ENABLED`` on a CPU) with
  a gradient check before every update.
* Data: the resumable training loader of :mod:`gfocalv2.data.loader` (datasets checked at
  start-up, unreadable images skipped, data order a function of (seed, iteration)) and a test
  loader over checked datasets; the test sets are checked when training starts, not at the
  first evaluation.
* Resume: the loader continues at the resumed iteration with the saved data seed, and the
  optimizer state is saved with Detectron2 0.6 too, so a resumed run trains on exactly the
  batches of an uninterrupted one: same weights, bit for bit, on CPU.
* Checkpoints: atomic writes and checked loads
  (:class:`~gfocalv2.engine.checkpoint.GFocalCheckpointer`).
* Faults: a failed step (non-finite loss or gradient, data loading, forward) saves the state
  after the previous iteration unless the periodic checkpointer already has it; a failing
  hook (an evaluation) saves the state of the iteration that has just finished; SIGTERM/SIGINT
  save the state and exit with 128 + the signal number. With several processes every process
  stops, the main process saves, and each names the checkpoint
  (:class:`~gfocalv2.engine.faults.ProcessFaults`). A failed or interrupted run neither
  evaluates nor writes ``model_final``.
* Evaluation: ``COCOEvaluator`` on an optimized copy of the model (``TEST.FOLD_BATCHNORM``,
  ``TEST.MEMORY_FORMAT``); a model that predicts nothing gets AP 0, not NaN.
"""

import contextlib
import logging
import os
import signal
import weakref

from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, hooks
from detectron2.engine.train_loop import TrainerBase
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data.datasets import check_datasets_registered, check_num_classes
from ..data.loader import build_checked_test_loader, build_resumable_train_loader
from ..modeling.inference_optimization import optimized_copy
from .checkpoint import checkpointer_for
from .distributed import check_batch_norm_across_processes, create_ddp_model
from .evaluation import build_coco_evaluator
from .faults import ProcessFailedError, ProcessFaults, StopSignals, stop_signal
from .train_step import (
    GuardedModel,
    NonFiniteLossError,
    all_finite_tensors,
    check_gradients_before_update,
)

__all__ = ["Trainer", "TrainingInterrupted", "DataSeedHook"]

logger = logging.getLogger(__name__)


class TrainingInterrupted(SystemExit):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint. A ``SystemExit`` with the
    conventional status 128 + signal number (143 for SIGTERM, 130 for SIGINT): scripts exit
    with it, without a traceback; ``message`` says where the state is."""

    def __init__(self, signum, message):
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.message = message

    def __str__(self):
        return self.message


class DataSeedHook(hooks.HookBase):
    """Keeps the training data seed in the trainer's checkpoint state, so that a resumed run
    continues the same data order and augmentations even when ``SEED`` is -1 (random)."""

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


class Trainer(DefaultTrainer):
    """See the module docstring."""

    # ------------------------------------------------------------------ set-up
    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):  # as DefaultTrainer
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        model = self.build_model(cfg)
        check_batch_norm_across_processes(model, cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)

        self._failed = False  # a step or hook failed: after_train then neither evaluates nor saves
        self._update_started = False
        self._faults = ProcessFaults()
        on_cpu = cfg.MODEL.DEVICE == "cpu"
        self._guarded_model = GuardedModel(
            model,
            get_iteration=lambda: self.iter,
            stop_requested=lambda: stop_signal() is not None,
            cpu_autocast=cfg.SOLVER.AMP.ENABLED and on_cpu,
        )
        inner = AMPTrainer if cfg.SOLVER.AMP.ENABLED and not on_cpu else SimpleTrainer
        self._trainer = inner(self._guarded_model, data_loader, optimizer)
        check_gradients_before_update(
            optimizer,
            self._guarded_model,
            lambda: self.iter,
            lambda: setattr(self, "_update_started", True),
        )

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = checkpointer_for(
            cfg, model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg

        self.register_hooks(self.build_hooks())
        # Check the test sets now (registered, files present, class count), not at the first
        # evaluation hours later: building their loaders loads and validates them.
        for name in cfg.DATASETS.TEST:
            self.build_test_loader(cfg, name)

    @property
    def model(self):
        """The model (DistributedDataParallel with several processes), without the guard."""
        return self._guarded_model.module

    def build_hooks(self):
        hook_list = super().build_hooks()
        loader = self._trainer.data_loader
        hook_list.append(DataSeedHook(loader.batch_sampler, loader.dataset))
        return hook_list

    # ------------------------------------------------------------------ data
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

    # ------------------------------------------------------------ evaluation
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_coco_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate an optimized copy of ``model`` (BatchNorms folded, ``TEST.MEMORY_FORMAT``):
        the same detections up to float rounding, faster; the training model is left as it is."""
        return super().test(cfg, optimized_copy(model, cfg), evaluators)

    # ------------------------------------------------------------------ resume
    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        loader = self._trainer.data_loader
        loader.set_start_iter(self.start_iter)  # before its first batch: the loader starts lazily
        if self.start_iter:
            logger.info(
                "Training data resumes at iteration %d (seed %d)", self.start_iter, loader.seed
            )

    def state_dict(self):
        # Detectron2 0.6's DefaultTrainer saves neither the optimizer nor the AMP grad scaler
        # (later versions do, under "_trainer"): without them a resumed run restarts SGD
        # momentum from zero and diverges from the uninterrupted run.
        ret = super().state_dict()
        if "_trainer" not in ret:
            ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        if "_trainer" in state_dict:
            super().load_state_dict(state_dict)  # after v0.6 loads "_trainer" here too: harmless
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            # Detectron2 after v0.6 reads state_dict["_trainer"] unconditionally (KeyError): load
            # the rest (iteration, hooks) as TrainerBase does.
            TrainerBase.load_state_dict(self, state_dict)
            logger.warning(
                "The checkpoint has no optimizer state (written by Detectron2's DefaultTrainer "
                "0.6?): SGD momentum restarts from zero"
            )

    # ------------------------------------------------------------------ steps
    def train(self):
        with StopSignals():
            return super().train()

    def run_step(self):
        self._guarded_model.begin_step()
        self._update_started = False
        try:
            super().run_step()
        except BaseException as e:
            self._failed = True
            # Failed in data loading, forward, loss check, backward or gradient check: the
            # weights and optimizer are still those after the previous iteration.
            if not self._update_started:
                self._guarded_model.restore_buffers()  # BatchNorm statistics of the failed forward
                saved = self._stop_together(e, self._save_last_good_state)
                if isinstance(e, NonFiniteLossError):
                    e.args = (
                        f"{e} {saved} To continue: lower SOLVER.BASE_LR, lengthen "
                        "SOLVER.WARMUP_ITERS or enable SOLVER.CLIP_GRADIENTS (and check these "
                        "images' annotations), then run again with --resume.",
                    )
            raise

    def before_step(self):
        with self._failing_marks_the_run():
            super().before_step()

    def after_step(self):
        # The iteration has finished: a hook that fails now (an evaluation, most likely) first
        # saves its state, whose LR step and periodic checkpoint have run before the evaluation.
        with self._failing_marks_the_run(
            save=lambda: self._save_state(self.iter, "the state before the failed hook")
        ):
            super().after_step()
        if self._guarded_model.stop_agreed:  # agreed by every process in this step's loss check
            self._failed = True  # no final evaluation or model_final of an interrupted run
            signum = stop_signal() or signal.SIGTERM  # or another process got the signal
            saved = self._share_save(self._save_state(self.iter, "the state at the interruption"))
            message = (
                f"Training stopped after iteration {self.iter} on {signal.Signals(signum).name}. "
                f"{saved} Continue with --resume."
            )
            logger.warning(message)
            raise TrainingInterrupted(signum, message)

    def after_train(self):
        if not self._failed:
            return super().after_train()
        # After a failed or interrupted step: no evaluation (the other processes may be gone)
        # and no checkpoint (Detectron2's would label the previous iteration's state as this one).
        self.storage.iter = self.iter
        for hook in self._hooks:
            if not isinstance(hook, (hooks.EvalHook, hooks.PeriodicCheckpointer)):
                hook.after_train()

    # ------------------------------------------------------------- on failure
    @contextlib.contextmanager
    def _failing_marks_the_run(self, save=None):
        """A hook that raises marks the run as failed (see :meth:`after_train`); with ``save``,
        every process stops and the main process saves first (see :meth:`_stop_together`)."""
        try:
            yield
        except BaseException as e:
            self._failed = True
            if save is not None and isinstance(
                e, Exception
            ):  # not on KeyboardInterrupt, SystemExit
                self._stop_together(e, save)
            raise

    def _stop_together(self, error, save):
        """After ``error`` in this process: make every process stop, ``save()`` on rank 0 (it
        returns a sentence saying where), and return that sentence in every process once rank 0
        has saved. Raises :class:`ProcessFailedError` (naming the process that failed first) when
        ``error`` is the echo of another process's failure."""
        # A non-finite loss or gradient is seen by every process at the same point (all-reduced);
        # anything else happened in this process alone, or is the echo of another's failure.
        alone = not isinstance(error, NonFiniteLossError)
        other = self._faults.posted_by_others() if alone else None
        if alone and other is None:
            self._faults.post(f"{type(error).__name__}: {error}")
            if not comm.is_main_process():
                self._faults.leave_collectives()  # unblock the others now, not at the timeout
        saved = self._share_save(save())
        if other is not None:
            raise ProcessFailedError(
                f"Stopped at iteration {self.iter} because process {other[0]} failed: {other[1]} "
                f"{saved}"
            ) from error
        if alone and self._faults.enabled:
            logger.error(
                "Iteration %d failed in this process (rank %d). %s",
                self.iter,
                comm.get_rank(),
                saved,
            )
        return saved

    def _share_save(self, saved):
        """Rank 0 tells the other processes what it saved (the sentence ``saved``); each of them
        waits for that and returns it: no process exits while rank 0 is still saving."""
        if comm.is_main_process():
            self._faults.publish_saved(saved)
            return saved
        return self._faults.wait_saved() if self._faults.enabled else saved

    def _save_last_good_state(self):
        """Checkpoint of the state after iteration ``self.iter - 1`` (the current step failed
        before changing anything); returns a sentence saying where."""
        if self.iter - 1 < self.start_iter:
            return (
                "Nothing was trained in this run yet; the last checkpoint (if any) is the last "
                "good state."
            )
        model = self.model
        if not all_finite_tensors(list(model.parameters()) + list(model.buffers())):
            has_last = self.checkpointer.has_checkpoint()
            last = self.checkpointer.get_checkpoint_file() if has_last else None
            logger.error(
                "The model's weights are not finite: not saving them over the last checkpoint"
            )
            return (
                "The model's weights had already become non-finite (an earlier update diverged), "
                "so they were not saved; the last good checkpoint is "
                f"{last or '(none: start over)'}."
            )
        return self._save_state(self.iter - 1, "the last good state")

    def _save_state(self, iteration, what):
        """Save the current state as the checkpoint of ``iteration`` (unless the periodic
        checkpointer already did); returns a sentence saying where."""
        name = f"model_{iteration:07d}"
        path = os.path.join(self.checkpointer.save_dir, name + ".pth")
        if os.path.isfile(path):
            return f"The state after iteration {iteration} is {path}."
        if not comm.is_main_process():
            return "The main process saves the state."
        it = self.iter
        try:
            self.iter = (
                iteration  # the trainer state stores self.iter as the iteration just finished
            )
            self.checkpointer.save(name, iteration=iteration)
        except Exception as err:  # noqa: BLE001  (never hide the original error)
            logger.error("Could not save %s to %s: %s", what, path, err)
            return f"Saving the state after iteration {iteration} to {path} failed ({err})."
        finally:
            self.iter = it
        logger.warning("Saved %s (after iteration %d) to %s", what, iteration, path)
        return f"The state after iteration {iteration} was saved to {path}."
