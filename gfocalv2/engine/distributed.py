"""Several processes, on any machine: ``--num-gpus N`` with CUDA (Detectron2's NCCL launch) and
without it (N CPU processes on the gloo backend, the same semantics).

* :func:`check_launch` refuses, before any process starts, what cannot run: ``--num-gpus`` below
  1, more processes than CUDA devices, an ``SOLVER.IMS_PER_BATCH`` that the processes cannot
  share evenly. Each message names the argument or config key and what to do.
* :func:`launch` is Detectron2's ``launch`` with the backend chosen from the config's device:
  ``MODEL.DEVICE cuda`` goes to Detectron2's launch (NCCL, one GPU per process);
  ``MODEL.DEVICE cpu`` starts the processes here, on gloo, each with its share of the CPU threads.
  Everything after that is the same: ``comm.get_world_size()`` processes, the per-machine
  process group, ``IMS_PER_BATCH`` split over the processes, evaluation gathered on rank 0.
* :func:`create_ddp_model` is the one place the training model is wrapped in
  ``DistributedDataParallel``: Detectron2's ``create_ddp_model``, with ``device_ids`` only for a
  CUDA model (DDP refuses them for a CPU model).
* :func:`check_batch_norm_across_processes`: trained BatchNorm statistics would diverge between
  processes (each normalizes with its own batch and keeps its own running statistics, and only
  rank 0's are saved), so a multi-process run with them is refused at start-up.
* :func:`launch_from_args`: all of the above for a ``train_net.py``-style script.

How the processes stop together (a failure in one, SIGTERM): :mod:`gfocalv2.engine.faults`.
"""

import inspect
import logging
import os
import signal
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import create_ddp_model as _detectron2_create_ddp_model
from detectron2.engine import launch as _detectron2_launch
from detectron2.utils import comm
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import compat
from .config_checks import ConfigError
from .faults import StopSignals

__all__ = [
    "LaunchError",
    "check_launch",
    "launch",
    "launch_from_args",
    "create_ddp_model",
    "check_batch_norm_across_processes",
    "DEFAULT_TIMEOUT",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)


class LaunchError(ConfigError):
    """The processes asked for cannot run here; the message says which argument and what to do."""


def _uses_cuda(device):
    return str(device).startswith("cuda")


def check_launch(cfg, num_gpus_per_machine, num_machines=1, training=True):
    """Raise :class:`LaunchError` if ``cfg`` cannot run on
    ``num_gpus_per_machine x num_machines`` processes (``training=False``: evaluation only,
    where BatchNorm statistics are not updated)."""
    if num_gpus_per_machine < 1:
        raise LaunchError(
            f"--num-gpus {num_gpus_per_machine}: give the number of processes per machine, at "
            "least 1 (one per GPU with CUDA; without CUDA, CPU processes)."
        )
    if num_machines < 1:
        raise LaunchError(f"--num-machines {num_machines}: give at least 1.")
    world_size = num_gpus_per_machine * num_machines
    if _uses_cuda(cfg.MODEL.DEVICE):
        available = torch.cuda.device_count()
        if num_gpus_per_machine > available:
            raise LaunchError(
                f"--num-gpus {num_gpus_per_machine}, but this machine has {available} CUDA "
                f"device(s): give at most --num-gpus {available} (one process per GPU), or "
                "MODEL.DEVICE cpu to run CPU processes."
            )
    if world_size > 1 and training:
        trained_bn = [key for key, value in _norm_keys(cfg.MODEL, "MODEL") if value == "BN"]
        if trained_bn:
            raise LaunchError(_batch_norm_message(trained_bn, world_size, cfg.MODEL.DEVICE))
    total = cfg.SOLVER.IMS_PER_BATCH
    if total <= 0 or total % world_size:
        fits = [n for n in range(1, total + 1) if total > 0 and total % n == 0]
        raise LaunchError(
            f"SOLVER.IMS_PER_BATCH {total} cannot be split evenly over {world_size} processes "
            f"(--num-gpus {num_gpus_per_machine} x --num-machines {num_machines}): each process "
            "takes IMS_PER_BATCH / processes images per step. Set SOLVER.IMS_PER_BATCH to a "
            f"multiple of {world_size}"
            + (
                f", or use a number of processes that divides {total} "
                f"({', '.join(map(str, fits))})."
                if fits
                else "."
            )
        )


def _norm_keys(node, prefix):
    """``(full key, value)`` of every ``*.NORM`` key under ``node``."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _norm_keys(value, f"{prefix}.{key}")
        elif key == "NORM":
            yield f"{prefix}.{key}", value


def _batch_norm_message(where, world_size, device):
    """``where``: config keys (set to "BN") or module names with trained, unsynchronized
    BatchNorm."""
    synced = "SyncBN" if _uses_cuda(device) else "naiveSyncBN"
    keys = [w for w in where if w.startswith("MODEL.")] or ["MODEL.RESNETS.NORM"]
    return (
        f"BatchNorm with trained statistics ({', '.join(where[:3])}) would train separately in "
        f"each of the {world_size} processes: they would normalize differently, and only rank "
        "0's statistics would be saved. Synchronize the statistics over the processes with "
        f"{' '.join(k + ' ' + synced for k in keys[:3])} "
        f"(Detectron2's {synced}{'' if _uses_cuda(device) else ', which runs on CPU and CUDA'}), "
        'or use frozen statistics ("FrozenBN", "BNEval") or "GN".'
    )


def _cpu_threads_per_process(num_processes):
    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) // num_processes)


def _cpu_worker(
    local_rank,
    main_func,
    world_size,
    num_per_machine,
    machine_rank,
    dist_url,
    args,
    timeout,
    threads,
):
    StopSignals().__enter__()  # for the life of this process (see faults.StopSignals)
    global_rank = machine_rank * num_per_machine + local_rank
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=dist_url, world_size=world_size, rank=global_rank, timeout=timeout
    )
    compat.create_local_process_group(num_per_machine, machine_rank)
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(
    main_func,
    num_gpus_per_machine,
    num_machines=1,
    machine_rank=0,
    dist_url=None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
    device="cuda",
):
    """Run ``main_func(*args)`` in ``num_gpus_per_machine x num_machines`` processes.

    ``device`` is the config's ``MODEL.DEVICE``: CUDA goes through Detectron2's launch (NCCL);
    a CPU device starts CPU processes on gloo (``dist_url`` as Detectron2's: ``"auto"`` for a
    free local port, one machine only).
    """
    if _uses_cuda(device):
        return _detectron2_launch(
            main_func,
            num_gpus_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=args,
            timeout=timeout,
        )
    world_size = num_machines * num_gpus_per_machine
    if world_size == 1:
        return main_func(*args)
    if dist_url is None or dist_url == "auto":
        if num_machines > 1:
            raise LaunchError(
                "--dist-url auto works on one machine only: give tcp://HOST:PORT of machine 0."
            )
        from detectron2.engine.launch import _find_free_port

        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    threads = _cpu_threads_per_process(num_gpus_per_machine)
    # Printed: the launching process has no logger set up, and this is the one thing it says.
    print(
        f"Starting {num_gpus_per_machine} CPU processes on the gloo backend ({threads} thread(s) "
        "each): CPU processes check a multi-process set-up, they do not make training faster.",
        flush=True,
    )
    context = mp.start_processes(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(
            main_func,
            world_size,
            num_gpus_per_machine,
            machine_rank,
            dist_url,
            args,
            timeout,
            threads,
        ),
        daemon=False,
        start_method="spawn",
        join=False,
    )
    _join_forwarding_signals(context)


#: Exit statuses of a process stopped by SIGINT / SIGTERM after saving (TrainingInterrupted).
_INTERRUPTED = {128 + signal.SIGINT: "SIGINT", 128 + signal.SIGTERM: "SIGTERM"}


#: How long the other processes get to stop by themselves once one has stopped or failed.
_STOP_GRACE_S = 120


def _join_forwarding_signals(context):
    """Wait for the worker processes. SIGTERM/SIGINT sent to this (launching) process are passed on
    to them (each finishes its step, saves, stops). Once one process has ended with an error or an
    interruption, the others get time to stop by themselves (they stop within seconds: see
    :class:`ProcessFaults`) before torch ends them. Workers that all stopped on a signal end this
    process with the same status, without a traceback; a failed worker raises here, with its
    error."""
    import multiprocessing.connection
    import time

    processes = context.processes

    def forward(signum, frame):
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        first_end = None
        while True:
            alive = [p for p in processes if p.exitcode is None]
            if not alive:
                break
            if first_end is None and any(p.exitcode not in (None, 0) for p in processes):
                first_end = time.monotonic()
            if first_end is not None and time.monotonic() - first_end > _STOP_GRACE_S:
                break  # join() below ends the rest
            multiprocessing.connection.wait([p.sentinel for p in alive], timeout=1.0)
        while not context.join():
            pass
    except mp.ProcessExitedException as e:
        if e.exit_code in _INTERRUPTED:
            raise SystemExit(e.exit_code) from None
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def create_ddp_model(model, **kwargs):
    """Detectron2's ``create_ddp_model`` (``model`` itself with one process), for CUDA and CPU
    models.

    ``broadcast_buffers`` (what Detectron2's trainer passes) becomes ``forward_sync_buffers`` where
    torch has it and deprecates the former: the same behaviour in the forward pass, and the buffers
    are still made equal once, when the model is wrapped."""
    if comm.get_world_size() > 1 and "device_ids" not in kwargs:
        device = next(model.parameters()).device
        kwargs["device_ids"] = [comm.get_local_rank()] if device.type == "cuda" else None
    if (
        "broadcast_buffers" in kwargs
        and "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    ):
        kwargs["forward_sync_buffers"] = kwargs.pop("broadcast_buffers")
    return _detectron2_create_ddp_model(model, **kwargs)


def _diverging_batch_norms(model):
    """Names of the BatchNorm modules whose statistics each process would train on its own."""
    from detectron2.layers import NaiveSyncBatchNorm

    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and not isinstance(module, (nn.SyncBatchNorm, NaiveSyncBatchNorm))
        and module.training
        and module.track_running_stats
    ]


def check_batch_norm_across_processes(model, cfg):
    """Refuse trained, unsynchronized BatchNorm in a multi-process run (see the module docstring).
    :func:`check_launch` finds the ``*.NORM "BN"`` config keys before any process starts; this
    finds the modules of any other origin."""
    if comm.get_world_size() == 1:
        return
    bad = _diverging_batch_norms(model)
    if bad:
        where = [f"module {name}" for name in bad]
        raise ConfigError(_batch_norm_message(where, comm.get_world_size(), cfg.MODEL.DEVICE))


def launch_from_args(main_func, args, *, prepare=None):
    """What ``train_net.py``-style scripts run: check the config and the process count here,
    in the launching process (a clear message and exit code 2, no traceback and no process
    started, if they cannot run), call ``prepare(cfg)`` once (e.g. generate a dataset that
    every process then reads), then :func:`launch` ``main_func(args)`` on the config's device."""
    import sys

    from .config_setup import build_cfg

    try:
        cfg = build_cfg(args.config_file, args.opts, getattr(args, "register_coco", None) or ())
        check_launch(cfg, args.num_gpus, args.num_machines, training=not args.eval_only)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if prepare is not None:
        prepare(cfg)
    return launch(
        main_func,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=cfg.MODEL.DEVICE,
    )
