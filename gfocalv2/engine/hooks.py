"""The hooks :class:`~gfocalv2.engine.trainer.Trainer` adds to Detectron2's, one job each."""

import contextlib
import logging
import signal
import threading

from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["DataSeedHook", "StopOnSignal"]

logger = logging.getLogger(__name__)


class DataSeedHook(HookBase):
    """Keeps the training data seed in the trainer's checkpoint state, so that a resumed run
    continues the same data order and augmentations even when ``SEED`` is -1 (random)."""

    def __init__(self, loader):
        self.loader = loader  # a gfocalv2.data.loader.ResumableTrainLoader

    def state_dict(self):
        return {"data_seed": int(self.loader.seed)}

    def load_state_dict(self, state):
        if "data_seed" in state:
            self.loader.set_seed(state["data_seed"])


class StopOnSignal(HookBase):
    """SIGTERM or SIGINT (preemption, ``kill``, Ctrl-C) stops training after a finished
    iteration, whose state is saved: ``trainer.interrupt(signum)`` (see
    :meth:`~gfocalv2.engine.trainer.Trainer.interrupt`).

    While training, the signals only set a flag (a second Ctrl-C interrupts at once). With one
    process the flag is read after every iteration; with several, the processes agree on it
    every ``period`` iterations and after the last one (one all-gather of a small integer on
    Detectron2's gloo group, no device synchronization), so they all stop after the same
    iteration. The trainer installs the handlers for its training loop only
    (:meth:`signals_recorded`), and with several processes from its construction on (a signal
    then stops every process together): before and after, a signal ends the process as usual.
    """

    def __init__(self, period=10):
        self.period = max(1, int(period))
        self.received = None  # the signal number, once one has come
        self._sigints = 0

    def _record(self, signum, frame):
        if signum == signal.SIGINT:
            self._sigints += 1
            if self._sigints > 1:  # Ctrl-C again: the user does not want to wait
                raise KeyboardInterrupt
        if self.received is None:
            logger.warning(
                "%s received: stopping after the current iteration, with a checkpoint",
                signal.Signals(signum).name,
            )
            self.received = signum

    @contextlib.contextmanager
    def signals_recorded(self):
        """Record SIGTERM/SIGINT instead of stopping, in the block (main thread only)."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, self._record) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def after_step(self):
        if comm.get_world_size() == 1:
            agreed = self.received
        else:
            done = self.trainer.iter + 1
            if done % self.period and done < self.trainer.max_iter:
                return
            agreed = max(comm.all_gather(int(self.received or 0))) or None
        if agreed:
            self.trainer.interrupt(agreed)
