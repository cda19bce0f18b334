"""Several processes: Detectron2's ``launch``, and what a ``--num-gpus`` user also needs.

* :func:`check_launch` refuses, in the launching process and before any process starts, what
  cannot run: ``--num-gpus`` below 1, more processes than CUDA devices, an
  ``SOLVER.IMS_PER_BATCH`` the processes cannot share, BatchNorm statistics that each process
  would train on its own. Each message names the argument or config key and what to do.
* :func:`launch` is Detectron2's ``launch`` (NCCL with CUDA; gloo without, as Detectron2 after
  v0.6 does and :mod:`gfocalv2.compat` makes v0.6 do), with three additions, each for one reason:
  CPU processes share the machine's cores (each would otherwise start a thread per core); a
  SIGTERM/SIGINT sent to the launcher reaches its workers (they save and stop, see
  :class:`~gfocalv2.engine.hooks.StopOnSignal`), and a worker ends with its launcher
  (Detectron2's launch leaves that as a TODO; :mod:`gfocalv2.spawn`); the launcher says what
  the processes wait for.
* :func:`launch_from_args`: both, for a ``train_net.py``-style script.
"""

import logging
import os
import signal
import sys
import tempfile

import torch
import torch.multiprocessing as mp
from detectron2.engine import default_argument_parser
from detectron2.engine import launch as detectron2_launch
from detectron2.modeling import build_model
from torch import nn

from ..config_checks import ConfigError
from ..modeling.norms import per_process_batch_norms
from ..spawn import WorkerMain

__all__ = ["LaunchError", "check_launch", "check_batch_norm", "launch", "launch_from_args"]

logger = logging.getLogger(__name__)

#: What ``--dist-url`` is when it is not given (Detectron2's ``default_argument_parser``).
_DEFAULT_DIST_URL = default_argument_parser().get_default("dist_url")


class LaunchError(ConfigError):
    """The processes asked for cannot run here; the message says which argument and what to do."""


def _uses_cuda(device):
    return str(device).startswith("cuda")


def check_launch(cfg, num_gpus_per_machine, num_machines=1, training=True):
    """Raise :class:`LaunchError` if ``cfg`` cannot run on ``num_gpus_per_machine x
    num_machines`` processes (``training=False``: evaluation only, where no statistics are
    trained)."""
    if num_gpus_per_machine < 1:
        raise LaunchError(
            f"--num-gpus {num_gpus_per_machine}: give the number of processes per machine, at "
            "least 1 (one per GPU with CUDA; without CUDA, CPU processes)."
        )
    if num_machines < 1:
        raise LaunchError(f"--num-machines {num_machines}: give at least 1.")
    world_size = num_gpus_per_machine * num_machines
    if _uses_cuda(cfg.MODEL.DEVICE) and num_gpus_per_machine > torch.cuda.device_count():
        available = torch.cuda.device_count()
        raise LaunchError(
            f"--num-gpus {num_gpus_per_machine}, but this machine has {available} CUDA "
            f"device(s): give at most --num-gpus {available} (one process per GPU), or "
            "MODEL.DEVICE cpu to run CPU processes."
        )
    total = cfg.SOLVER.IMS_PER_BATCH
    if total <= 0 or total % world_size:
        fits = [n for n in range(1, total + 1) if total % n == 0]
        raise LaunchError(
            f"SOLVER.IMS_PER_BATCH {total} cannot be split evenly over {world_size} processes "
            f"(--num-gpus {num_gpus_per_machine} x --num-machines {num_machines}): each process "
            "takes IMS_PER_BATCH / processes images per step. Set SOLVER.IMS_PER_BATCH to a "
            f"multiple of {world_size}"
            + (f", or use a number of processes that divides {total} ({fits})." if fits else ".")
        )
    if world_size > 1 and training:
        # The model itself, built on the CPU in training mode: every norm layer is judged by the
        # one rule the trainer and the inference rewrites use, whatever config key made it.
        cpu_cfg = cfg.clone()
        cpu_cfg.defrost()
        cpu_cfg.MODEL.DEVICE = "cpu"
        cpu_cfg.MODEL.TIMM.PRETRAINED = False  # the norms do not depend on the weights
        check_batch_norm(build_model(cpu_cfg).train(), cfg, world_size)


def check_batch_norm(model, cfg, world_size):
    """Raise :class:`LaunchError` if ``model`` (in training mode) has BatchNorm statistics that
    each of the ``world_size`` processes would train on its own: they would normalize
    differently, and only rank 0's statistics would be saved."""
    if world_size <= 1:
        return
    if not _uses_cuda(cfg.MODEL.DEVICE):
        # PyTorch's SyncBatchNorm synchronizes CUDA tensors only: on CPU its first training
        # step would fail in every process.
        cuda_only = [n for n, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)]
        if cuda_only and model.training:
            keys = [key for key, value in _norm_keys(cfg.MODEL, "MODEL") if value == "SyncBN"]
            fix = " ".join(f"{key} naiveSyncBN" for key in keys) or "naiveSyncBN"
            raise LaunchError(
                f"SyncBN ({', '.join(cuda_only[:3])}"
                f"{f' and {len(cuda_only) - 3} more' if len(cuda_only) > 3 else ''}) synchronizes "
                f"CUDA tensors only, and these {world_size} processes run on "
                f"{cfg.MODEL.DEVICE}: use Detectron2's CPU-capable synchronized BatchNorm ({fix})."
            )
    names = per_process_batch_norms(model)
    if not names:
        return
    synced = "SyncBN" if _uses_cuda(cfg.MODEL.DEVICE) else "naiveSyncBN"
    keys = [key for key, value in _norm_keys(cfg.MODEL, "MODEL") if value == "BN"]
    fix = " ".join(f"{key} {synced}" for key in keys) or f"the norm of these modules to {synced}"
    raise LaunchError(
        f"BatchNorm with trained statistics ({', '.join(names[:3])}"
        f"{f' and {len(names) - 3} more' if len(names) > 3 else ''}) would train separately in "
        f"each of the {world_size} processes: they would normalize differently, and only rank "
        f"0's statistics would be saved. Synchronize them over the processes ({fix}; Detectron2's "
        f'{synced}), or use frozen statistics ("FrozenBN", "BNEval") or "GN".'
    )


def _norm_keys(node, prefix):
    """``(full key, value)`` of every ``*.NORM`` key under ``node``."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _norm_keys(value, f"{prefix}.{key}")
        elif key == "NORM":
            yield f"{prefix}.{key}", value


def _forward_stop_signals(received):
    """SIGTERM/SIGINT sent to the launcher (``kill``, ``timeout``, a scheduler) go on to its
    workers as SIGTERM: while training, each finishes its iteration, rank 0 saves, they stop;
    before (waiting for their peers, loading data), they stop at once. (Ctrl-C in a terminal
    reaches every process of the group by itself.) The first signal is recorded in ``received``.
    Returns the previous handlers."""

    def forward(signum, frame):
        received.setdefault("signum", signum)
        for child in mp.active_children():
            os.kill(child.pid, signal.SIGTERM)

    return {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}


def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url="auto",
           args=(), device="cuda"):  # fmt: skip
    """Run ``main_func(*args)`` in ``num_gpus_per_machine x num_machines`` processes with
    Detectron2's ``launch`` (see the module docstring); ``device`` is ``MODEL.DEVICE``. Workers
    that all stopped on a signal end the launcher with their exit status, without a
    traceback."""
    world_size = num_gpus_per_machine * num_machines
    if world_size == 1:
        return main_func(*args)
    if not _uses_cuda(device) and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // num_gpus_per_machine)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # read by each worker's torch at start
    backend = "NCCL" if _uses_cuda(device) and torch.cuda.is_available() else "gloo"
    rendezvous = None
    if num_machines == 1 and dist_url in ("auto", _DEFAULT_DIST_URL):
        # Detectron2's default is one port per user (tcp://127.0.0.1:49152 for root) and "auto"
        # picks a free port that another job may take before the workers bind it: two jobs on
        # one machine then fail with "address already in use", or meet at the same port. A file
        # of this launch's own is a rendezvous no other job can reach.
        rendezvous = tempfile.TemporaryDirectory(prefix="gfocalv2_rendezvous_")
        dist_url = "file://" + os.path.join(rendezvous.name, "store")
    where = dist_url
    print(
        f"Starting {num_gpus_per_machine} processes ({backend}"
        + (f", {os.environ['OMP_NUM_THREADS']} CPU thread(s) each" if backend == "gloo" else "")
        + (
            f"; machine {machine_rank} of {num_machines}: they wait for all {world_size} "
            f"processes to join at {where}"
            if num_machines > 1
            else ""
        )
        + ").",
        flush=True,
    )
    received = {}
    previous = _forward_stop_signals(received)
    try:
        detectron2_launch(
            WorkerMain(main_func),
            num_gpus_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=args,
        )
    except mp.ProcessExitedException as e:
        # stopped on a signal: after saving (143, 130), or at once before training (-15)
        if e.exit_code in (128 + signal.SIGTERM, 128 + signal.SIGINT):
            raise SystemExit(e.exit_code) from None
        if received and e.exit_code == -signal.SIGTERM:
            raise SystemExit(128 + received["signum"]) from None
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if rendezvous is not None:
            rendezvous.cleanup()


def launch_from_args(main_func, args, *, prepare=None):
    """What ``train_net.py``-style scripts run: check the config and the process count here,
    in the launching process (a clear message and exit status 2, no traceback and no process
    started, if they cannot run), call ``prepare(cfg)`` once (e.g. generate a dataset that
    every process then reads), then :func:`launch` ``main_func(args)``."""
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
