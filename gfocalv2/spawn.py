"""The start of a worker process that :func:`gfocalv2.engine.launch.launch` spawns.

Detectron2's ``launch`` pickles the function each worker runs, and a spawned worker unpickles
it before anything else. :class:`WorkerMain` carries that function pickled once more, so that
unpickling it does, in this order: make the worker end with its launcher (Linux
``PR_SET_PDEATHSIG``, and a thread that watches for a new parent: no worker outlives its
launcher, not even one still waiting for its peers); apply :mod:`gfocalv2.compat` (the
worker's entry point: the fixes must come before any import of Detectron2); and only then
unpickle the function, whose module imports Detectron2.
This module imports neither torch nor Detectron2.
"""

import ctypes
import os
import pickle
import signal
import sys
import threading
import time

__all__ = ["WorkerMain"]


def _end_with(launcher_pid):
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() != launcher_pid:  # the launcher died before that
        os._exit(128 + signal.SIGTERM)
    # The parent-death signal is not always delivered (measured: a worker waiting in the
    # rendezvous outlived its SIGKILLed launcher), and other systems have none: a watcher
    # thread ends the worker too once it has a new parent.
    threading.Thread(target=_watch_launcher, args=(launcher_pid,), daemon=True).start()


def _watch_launcher(launcher_pid, period=1.0):
    while os.getppid() == launcher_pid:
        time.sleep(period)
    os._exit(128 + signal.SIGTERM)


class WorkerMain:
    """``main_func`` as the worker processes get it (see the module docstring)."""

    def __init__(self, main_func):
        self.main_func = main_func
        self.launcher_pid = os.getpid()

    def __call__(self, *args):
        return self.main_func(*args)

    def __getstate__(self):
        return {"launcher_pid": self.launcher_pid, "main_func": pickle.dumps(self.main_func)}

    def __setstate__(self, state):
        self.launcher_pid = state["launcher_pid"]
        _end_with(self.launcher_pid)
        from . import compat

        compat.apply()
        self.main_func = pickle.loads(state["main_func"])
