"""``ReliableTrainerMixin``: what a long training run needs to survive bad data and faults,
as a mixin for Detectron2's ``DefaultTrainer``::

    class Trainer(ReliableTrainerMixin, DefaultTrainer): ...

* Data: the training loader of :mod:`gfocalv2.data.loader` (datasets checked at start-up,
  unreadable images skipped with a warning, data order a function of (seed, iteration));
  the test loader over checked datasets, with failures naming the image.
* Resume: ``resume_or_load`` puts the loader at the resumed iteration (and the data seed
  saved in the checkpoint), so a resumed run trains on exactly the batches an uninterrupted
  one would: same weights, bit for bit, on CPU.
* Checkpoints: written atomically (:class:`~gfocalv2.engine.checkpoint.GFocalCheckpointer`),
  loads checked (missing file, other architecture, other class count).
* Faults during a step: a non-finite loss is caught before ``backward()``
  (:class:`~gfocalv2.engine.hooks.LossGuard`); for it, and for any other failure before the
  update (data loading, forward), the state after the previous iteration is saved as a
  regular checkpoint (``model_{iter-1}.pth`` + ``last_checkpoint``) unless the periodic
  checkpointer already has it, so ``--resume`` continues from there.
* Evaluation: a model that predicts nothing gets AP 0 for every metric, not NaN / ``{}``.
"""
import contextlib
import logging
import math
import os
import signal
from collections import OrderedDict

from detectron2.engine.hooks import EvalHook, PeriodicCheckpointer
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from .checkpoint import GFocalCheckpointer, checkpointer_for
from .faults import ProcessFailedError, ProcessFaults, StopSignals, stop_signal
from .hooks import DataSeedHook, LossGuard, NonFiniteLossError, all_finite_tensors, guard_optimizer_step

__all__ = ["ReliableTrainerMixin", "NothingPredictedEvaluator", "TrainingInterrupted"]

logger = logging.getLogger(__name__)


class TrainingInterrupted(SystemExit):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint. A ``SystemExit`` with the
    conventional status 128 + signal number (143 for SIGTERM, 130 for SIGINT): scripts exit with
    it, without a traceback; ``message`` says where the state is."""

    def __init__(self, signum, message):
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.message = message

    def __str__(self):
        return self.message


class NothingPredictedEvaluator(DatasetEvaluator):
    """Wraps an evaluator; when the model predicted no instance on the whole dataset, every
    metric of the result (Detectron2's COCOEvaluator gives NaN or ``{}``) becomes 0.0."""

    METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

    def __init__(self, evaluator, dataset_name):
        self.evaluator = evaluator
        self.dataset_name = dataset_name
        self._num_instances = 0
        self._num_images = 0

    def reset(self):
        self._num_instances = 0
        self._num_images = 0
        self.evaluator.reset()

    def process(self, inputs, outputs):
        self._num_images += len(outputs)
        for out in outputs:
            if isinstance(out, dict) and "instances" in out:
                self._num_instances += len(out["instances"])
            else:
                self._num_instances += 1  # not a detector's output: leave it alone
        self.evaluator.process(inputs, outputs)

    def evaluate(self):
        results = self.evaluator.evaluate()
        total = sum(comm.all_gather(self._num_instances)) if comm.get_world_size() > 1 else self._num_instances
        images = sum(comm.all_gather(self._num_images)) if comm.get_world_size() > 1 else self._num_images
        if total > 0 or not comm.is_main_process():
            return results
        from detectron2.data import MetadataCatalog

        results = OrderedDict(results or {})
        bbox = OrderedDict((k, 0.0) for k in self.METRICS)
        for name in getattr(MetadataCatalog.get(self.dataset_name), "thing_classes", None) or []:
            bbox[f"AP-{name}"] = 0.0
        for task, values in list(results.items()):
            if isinstance(values, dict):
                results[task] = OrderedDict((k, 0.0 if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items())
                for k in bbox:
                    results[task].setdefault(k, 0.0)
        results.setdefault("bbox", bbox)
        logger.warning(
            "The model predicted no box on %s (%d images): every AP is reported as 0", self.dataset_name, images
        )
        return results


class ReliableTrainerMixin:
    """See the module docstring. Put it before ``DefaultTrainer`` in the bases."""

    # ------------------------------------------------------------------ set-up
    def __init__(self, cfg):
        super().__init__(cfg)
        inner = self._trainer
        self._failed = False  # a step or hook failed: after_train then neither evaluates nor saves
        self._faults = ProcessFaults()
        self._loss_guard = LossGuard(inner.model, lambda: self.iter, lambda: stop_signal() is not None)
        inner.model = self._loss_guard
        self._update_started = False
        guard_optimizer_step(
            inner.optimizer, lambda: setattr(self, "_update_started", True), lambda: self.iter, lambda: self._loss_guard
        )
        # Check the test sets now (registered, files present, class count), not at the first
        # evaluation hours later: building their loaders loads and validates them.
        for name in self.cfg.DATASETS.TEST:
            type(self).build_test_loader(self.cfg, name)

    @property
    def model(self):
        """The model itself (the inner trainer calls it through the LossGuard)."""
        model = self._trainer.model
        return model.module if isinstance(model, LossGuard) else model

    @model.setter
    def model(self, value):
        self._trainer.model = value

    @classmethod
    def build_train_loader(cls, cfg):
        from ..data.loader import build_resumable_train_loader

        return build_resumable_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        from ..data.loader import build_checked_test_loader

        return build_checked_test_loader(cfg, dataset_name)

    def _train_sampler(self):
        loader = getattr(self._trainer, "data_loader", None)
        from ..data.loader import ResumableBatchSampler

        sampler = getattr(loader, "batch_sampler", None)
        return sampler if isinstance(sampler, ResumableBatchSampler) else None

    def build_hooks(self):
        old = self.checkpointer
        if not isinstance(old, GFocalCheckpointer):  # DefaultTrainer's: same arguments, atomic saves + checked loads
            self.checkpointer = checkpointer_for(self.cfg, old.model, old.save_dir, **old.checkpointables)
        hooks = super().build_hooks()
        for hook in hooks:
            if isinstance(hook, EvalHook) and hasattr(hook, "_func"):
                hook._func = self._checkpoint_if_fails(hook._func)
        sampler = self._train_sampler()
        if sampler is not None:
            hooks.append(DataSeedHook(sampler, getattr(self._trainer.data_loader, "dataset", None)))
        return hooks

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        sampler = self._train_sampler()
        if sampler is None:
            if self.start_iter > 0:
                logger.warning("The training loader is not resumable: the data order after a resume differs")
            return
        sampler.set_start_iter(self.start_iter)
        inner = self._trainer
        if "_data_loader_iter_obj" in vars(inner):  # newer Detectron2: created lazily
            inner._data_loader_iter_obj = None
        else:
            inner._data_loader_iter = iter(inner.data_loader)
        if self.start_iter:
            logger.info("Training data resumes at iteration %d (seed %d)", self.start_iter, sampler.seed)

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
            super().load_state_dict(state_dict)  # Detectron2 after v0.6 loads "_trainer" here too: harmless
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            # Detectron2 after v0.6 reads state_dict["_trainer"] unconditionally (KeyError): load the
            # rest (iteration, hooks) as TrainerBase does.
            TrainerBase.load_state_dict(self, state_dict)
            logger.warning(
                "The checkpoint has no optimizer state (written by Detectron2's DefaultTrainer 0.6?): "
                "SGD momentum restarts from zero"
            )

    # ------------------------------------------------------------------ steps
    def run_step(self):
        self._loss_guard.begin_step()
        self._update_started = False
        try:
            super().run_step()
        except BaseException as e:
            self._failed = True
            # Failed in data loading, forward, loss check, backward or gradient check: the
            # weights and optimizer are still those after the previous iteration.
            if not self._update_started:
                self._loss_guard.restore_buffers()  # BatchNorm statistics of the failed forward
                saved = self._stop_together(e, self._save_last_good_state)
                if isinstance(e, NonFiniteLossError):
                    e.args = (
                        f"{e} {saved} To continue: lower SOLVER.BASE_LR, lengthen SOLVER.WARMUP_ITERS or enable "
                        "SOLVER.CLIP_GRADIENTS (and check these images' annotations), then run again with --resume.",
                    )
            raise

    def _stop_together(self, error, save):
        """After ``error`` in this process: make every process stop, ``save()`` on rank 0 (it returns a
        sentence saying where), and return that sentence in every process once rank 0 has saved.
        Raises :class:`ProcessFailedError` (naming the process that failed first) when ``error`` is
        the echo of another process's failure. See :class:`~gfocalv2.engine.faults.ProcessFaults`."""
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
                f"Stopped at iteration {self.iter} because process {other[0]} failed: {other[1]} {saved}"
            ) from error
        if alone and self._faults.enabled:
            logger.error("Iteration %d failed in this process (rank %d). %s", self.iter, comm.get_rank(), saved)
        return saved

    def _share_save(self, saved):
        """Rank 0 tells the other processes what it saved (the sentence ``saved``); each of them waits
        for that and returns it: no process exits while rank 0 is still saving."""
        if comm.is_main_process():
            self._faults.publish_saved(saved)
            return saved
        return self._faults.wait_saved() if self._faults.enabled else saved

    @contextlib.contextmanager
    def _failing_marks_the_run(self):
        """A hook that raises marks the run as failed (see :meth:`after_train`)."""
        try:
            yield
        except BaseException:
            self._failed = True
            raise

    def before_step(self):
        with self._failing_marks_the_run():
            super().before_step()

    def after_step(self):
        with self._failing_marks_the_run():
            super().after_step()
        if self._loss_guard.stop_agreed:  # agreed by every process during this step's loss check
            self._failed = True  # no final evaluation or model_final of an interrupted run
            signum = stop_signal() or signal.SIGTERM  # or another process got the signal
            saved = self._share_save(self._save_state(self.iter, "the state at the interruption"))
            message = (f"Training stopped after iteration {self.iter} on {signal.Signals(signum).name}. {saved} "
                       "Continue with --resume.")
            logger.warning(message)
            raise TrainingInterrupted(signum, message)

    def train(self):
        with StopSignals():
            return super().train()

    def after_train(self):
        if not self._failed:
            return super().after_train()
        # After a failed or interrupted step: no evaluation (the other processes may be gone) and no
        # checkpoint (Detectron2's would label the state of the previous iteration as this one).
        self.storage.iter = self.iter
        for hook in self._hooks:
            if not isinstance(hook, (EvalHook, PeriodicCheckpointer)):
                hook.after_train()

    def _checkpoint_if_fails(self, evaluate):
        """An evaluation that fails during training first saves the state of the iteration that
        has just finished (its periodic hooks, LR step and checkpointer included, have run)."""

        def guarded():
            try:
                return evaluate()
            except BaseException as e:
                self._failed = True
                if self.iter < self.max_iter:  # during training (after_train has iter == max_iter)
                    self._stop_together(e, lambda: self._save_state(self.iter, "before the failed evaluation"))
                raise

        return guarded

    def _save_last_good_state(self):
        """Checkpoint of the state after iteration ``self.iter - 1`` (the current step failed before
        changing anything); returns a sentence saying where."""
        if self.iter - 1 < self.start_iter:
            return "Nothing was trained in this run yet; the last checkpoint (if any) is the last good state."
        model = self.model
        if not all_finite_tensors(list(model.parameters()) + list(model.buffers())):
            last = self.checkpointer.get_checkpoint_file() if self.checkpointer.has_checkpoint() else None
            logger.error("The model's weights are not finite: not saving them over the last checkpoint")
            return (
                "The model's weights had already become non-finite (an earlier update diverged), so they were "
                f"not saved; the last good checkpoint is {last or '(none: start over)'}."
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
            self.iter = iteration  # the trainer state stores self.iter as the iteration that just finished
            self.checkpointer.save(name, iteration=iteration)
        except Exception as err:  # noqa: BLE001  (never hide the original error)
            logger.error("Could not save %s to %s: %s", what, path, err)
            return f"Saving the state after iteration {iteration} to {path} failed ({err})."
        finally:
            self.iter = it
        logger.warning("Saved %s (after iteration %d) to %s", what, iteration, path)
        return f"The state after iteration {iteration} was saved to {path}."

    # -------------------------------------------------------------- evaluation
    @classmethod
    def test(cls, cfg, model, evaluators=None):
        if evaluators is None:
            evaluators = []
            for name in cfg.DATASETS.TEST:
                try:
                    evaluators.append(NothingPredictedEvaluator(cls.build_evaluator(cfg, name), name))
                except NotImplementedError:
                    return super().test(cfg, model, None)
        return super().test(cfg, model, evaluators)
