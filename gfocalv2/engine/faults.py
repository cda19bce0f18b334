"""Stopping every process of a run together: after a failure in any one of them, or on SIGTERM /
SIGINT, with the last good state saved by rank 0 before any process exits. Used by
:class:`~gfocalv2.engine.trainer.Trainer` and the CPU launcher of
:mod:`gfocalv2.engine.distributed`; with one process, only the signal handling remains.
"""

import logging
import signal
import threading
from datetime import timedelta

import torch.distributed as dist
from detectron2.utils import comm

__all__ = ["ProcessFaults", "ProcessFailedError", "StopSignals", "stop_signal"]

logger = logging.getLogger(__name__)


#: The signal (SIGTERM/SIGINT) that asked this process to stop, once one has; see StopSignals.
_stop_signal = None


def stop_signal():
    """The SIGTERM/SIGINT received since :class:`StopSignals` was installed, or None."""
    return _stop_signal


class StopSignals:
    """SIGTERM / SIGINT (preemption, Ctrl-C) only record that the process should stop: the trainer
    finishes the current step in every process, saves it and stops (see ``engine/trainer.py``).

    A context manager; installed for the whole life of a worker process (so a signal that comes
    before training starts is not lost), and by ``Trainer.train()`` otherwise. Only the main thread
    can install handlers: elsewhere it does nothing. Nested uses keep the outer handlers."""

    def __enter__(self):
        global _stop_signal, _sigints
        self.previous = {}
        if threading.current_thread() is not threading.main_thread():
            return self
        if signal.getsignal(signal.SIGTERM) is _record_stop:
            return self  # already installed (worker process)
        _stop_signal, _sigints = None, 0
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, _record_stop)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        return False


_sigints = 0


def _record_stop(signum, frame):
    global _stop_signal, _sigints
    if signum == signal.SIGINT:
        _sigints += 1
        if _sigints > 1:  # Ctrl-C again: the user does not want to wait for the step to end
            raise KeyboardInterrupt
    if _stop_signal is None:
        logger.warning(
            "%s received: stopping after the current iteration, with a checkpoint",
            signal.Signals(signum).name,
        )
    _stop_signal = signum


class ProcessFaults:
    """Tells every process of a run about a failure in any one of them, outside the collectives.

    Collectives cannot carry this news: when one process fails on its own (an exception in its
    data loading or forward pass), the others are blocked in a collective that it will never
    join. The processes share the key-value store of their rendezvous (hosted by rank 0), so:

    * the process that failed first posts its error (:meth:`post`) and, if it is not rank 0,
      leaves the process group (:meth:`leave_collectives`): the collectives the others are
      blocked in then fail at once (gloo), instead of after the collective timeout;
    * rank 0 saves the last good state, then posts what it saved (:meth:`publish_saved`);
    * every other process waits for that (:meth:`wait_saved`) before it exits, so the launcher
      never terminates rank 0 in the middle of its save, and each process's error says where the
      state is.

    With one process every method is a no-op (``enabled`` is False).
    """

    _KEY = "gfocalv2/fault/"
    _SAVED = "gfocalv2/saved"

    def __init__(self):
        self.rank = comm.get_rank()
        self.world_size = comm.get_world_size()
        self.store = None
        if self.world_size > 1 and dist.is_initialized():
            try:
                self.store = dist.distributed_c10d._get_default_store()
            except Exception as e:  # noqa: BLE001  (a torch without it: faults then end at the collective timeout)
                logger.warning("No rendezvous store to report failures between processes (%s)", e)

    @property
    def enabled(self):
        return self.store is not None

    def post(self, message):
        if self.enabled:
            self._try(lambda: self.store.set(f"{self._KEY}{self.rank}", message))

    def posted_by_others(self):
        """``(rank, message)`` of a failure another process posted, or None."""
        if not self.enabled:
            return None
        for rank in range(self.world_size):
            key = f"{self._KEY}{rank}"
            if rank != self.rank and self._try(lambda key=key: self.store.check([key]), False):
                return rank, self._try(
                    lambda key=key: self.store.get(key).decode(), "(unknown error)"
                )
        return None

    def leave_collectives(self):
        if self.enabled and dist.is_initialized():
            self._try(dist.destroy_process_group)

    def publish_saved(self, sentence):
        if self.enabled:
            self._try(lambda: self.store.set(self._SAVED, sentence))

    def wait_saved(self, timeout_s=600):
        """What rank 0 says it saved, once it has; a sentence saying so if it cannot tell."""
        if not self.enabled:
            return ""
        try:
            self.store.wait([self._SAVED], timedelta(seconds=timeout_s))
            return self.store.get(self._SAVED).decode()
        except Exception:  # noqa: BLE001  (rank 0 is gone or did not answer in time)
            return (
                "The main process (rank 0) did not confirm a save (it may have failed too); the "
                "last checkpoint in OUTPUT_DIR (last_checkpoint) is the state to resume from."
            )

    @staticmethod
    def _try(fn, default=None):
        try:
            return fn()
        except Exception:  # noqa: BLE001  (reporting must never hide the original error)
            return default


class ProcessFailedError(RuntimeError):
    """Another process of the run failed; this one stopped with it. The message names both."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""
