"""Helpers of the multi-process tests: the command of a tiny 2-process CPU run of train_net.py,
a fault injector, and step functions run in each process by ``gfocalv2.engine.launch.launch``.

Run ``python -m tests.utils.multiprocess [train_net.py arguments]`` (:data:`HARNESS`, from the
repository root) to train with a fault injected as ``GFOCALV2_TEST_FAULT=KIND:RANK:ITERATION``:
that rank's training forward pass at that iteration returns NaN losses (KIND ``nan``) or raises
(``error``), or its evaluation after that iteration raises (``eval``).
"""

import glob
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: ``python -m HARNESS [train_net.py arguments]``: train_net.main with the faults of this module.
HARNESS = "tests.utils.multiprocess"

DIGITS_CONFIG = os.path.join(
    REPO, "projects", "DigitScenes", "configs", "gfocalv2_R_18_digits.yaml"
)


def run_opts(data, out, max_iter=6, ims_per_batch=4, extra=()):
    """train_net.py arguments: the DigitScenes model (head on P3-P5, naiveSyncBN) shrunk to 64
    px: the workflow tests' tiny overrides, with a batch to split, a step and a seed."""
    from tests.utils.workflow import tiny_opts

    train, val = data["train"], data["val"]
    return [
        "--config-file",
        DIGITS_CONFIG,
        "--register-coco",
        "mp_train",
        *train,
        "--register-coco",
        "mp_val",
        *val,
        *tiny_opts(out, "mp_train", "mp_val", max_iter=max_iter),
        "SOLVER.IMS_PER_BATCH",
        str(ims_per_batch),
        "SOLVER.STEPS",
        "(4,)",
        "SOLVER.CHECKPOINT_PERIOD",
        "3",
        "SEED",
        "0",
        *extra,
    ]


def _env(env):
    """The environment of a run: the repository root on PYTHONPATH (``tests.utils`` and
    ``train_net`` importable, in the launched processes too), one OpenMP thread."""
    from tests.utils.workflow import env_with_repo_on_pythonpath

    return {**env_with_repo_on_pythonpath(), "OMP_NUM_THREADS": "1", **(env or {})}


def start(argv, script=None, env=None, module=HARNESS):
    """Start ``python script argv``, else ``python -m module argv`` (by default the harness:
    train_net.py's main, with the faults of this module; ``python argv`` if neither), in the
    repository root and in its own session, so that a hang can be killed with its children."""
    if script:
        command = [os.path.join(REPO, script)]
    else:
        command = ["-m", module] if module else []
    return subprocess.Popen(
        [sys.executable, *command, *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=_env(env),
    )


#: Seconds the processes get to write their Python stacks before a hung run is killed (3 s was
#: once too short for a worker under a load of 7 on 2 cores).
_STACK_DUMP_S = 10


def finish(proc, timeout, logs=None):
    """``(exit code, output)``. A run past ``timeout`` seconds fails with what it printed: first
    every process of the run (launcher, workers, data loader workers: one process group) is
    asked for its Python stacks (SIGUSR1, see :func:`_dump_stacks_on_sigusr1`), then killed; the
    error shows the output and every rank's log from ``logs`` (an OUTPUT_DIR), if given."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # One process at a time: dumps written at once interleave in the shared output.
        for pid in _process_group(proc.pid):
            try:
                os.kill(pid, signal.SIGUSR1)
                time.sleep(0.3)
            except ProcessLookupError:
                pass
        time.sleep(_STACK_DUMP_S)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, _ = proc.communicate(timeout=30)
        rank_logs = ""
        for name in sorted(glob.glob(os.path.join(str(logs), "log.txt*")) if logs else []):
            with open(name) as f:
                rank_logs += f"\n----- {name} (end)\n{f.read()[-3000:]}"
        raise AssertionError(
            f"did not finish within {timeout} s (hang?). Output, with each process's Python "
            f"stacks at the end:\n{out[-12000:]}{rank_logs}"
        ) from None
    return proc.returncode, out


def run(argv, timeout, script=None, env=None, module=HARNESS, logs=None):
    start_time = time.monotonic()
    code, out = finish(start(argv, script, env, module), timeout, logs)
    return code, out, time.monotonic() - start_time


def _process_group(pgid):
    """The pids of process group ``pgid``, the group leader first (from /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ...
            members.append(int(entry))
    return sorted(members, key=lambda pid: pid != pgid)


def _dump_stacks_on_sigusr1():
    """In every process that imports this module (the harness and its spawned workers, which
    import it as their main module): SIGUSR1 writes every thread's Python stack to stderr."""
    import faulthandler

    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)


# -------------------------------------------------------------- fault injection (in each process)
def _inject_fault(kind, rank, iteration):
    from detectron2.utils import comm
    from detectron2.utils.events import get_event_storage

    from gfocalv2.modeling.meta_arch import GFocalV2

    forward = GFocalV2.forward

    def faulty(self, batched_inputs):
        if (
            kind == "eval"
            and not self.training
            and comm.get_rank() == rank
            and get_event_storage().iter == iteration
        ):
            raise RuntimeError(
                f"injected evaluation failure on rank {rank} after iteration {iteration}"
            )
        out = forward(self, batched_inputs)
        if (
            kind != "eval"
            and self.training
            and comm.get_rank() == rank
            and get_event_storage().iter == iteration
        ):
            if kind == "nan":
                return {k: v * float("nan") for k, v in out.items()}
            raise RuntimeError(f"injected failure on rank {rank} at iteration {iteration}")
        return out

    GFocalV2.forward = faulty


def _record_batches(out_dir):
    """Each process writes the image ids of each iteration's batch to batches_rank{r}.json."""
    import json

    from detectron2.engine import HookBase
    from detectron2.utils import comm

    from gfocalv2.engine import Trainer

    class RecordBatches(HookBase):
        def __init__(self):
            self.ids = {}

        def after_step(self):
            self.ids[self.trainer.iter] = [
                str(d["image_id"]) for d in self.trainer.data_loader.last_batch
            ]

        def after_train(self):
            with open(os.path.join(out_dir, f"batches_rank{comm.get_rank()}.json"), "w") as f:
                json.dump(self.ids, f)

    build_hooks = Trainer.build_hooks
    Trainer.build_hooks = lambda self: build_hooks(self) + [RecordBatches()]


def train_main(args):
    """train_net.main, with the fault of GFOCALV2_TEST_FAULT injected first, recording each
    process's batches in GFOCALV2_TEST_RECORD (a folder) if set."""
    fault = os.environ.get("GFOCALV2_TEST_FAULT")
    if fault:
        kind, rank, iteration = fault.split(":")
        _inject_fault(kind, int(rank), int(iteration))
    if os.environ.get("GFOCALV2_TEST_RECORD"):
        _record_batches(os.environ["GFOCALV2_TEST_RECORD"])
    import train_net

    return train_net.main(args)


# ------------------------------------------------------- one step in each process (gradients, data)
def one_step_worker(out_dir, images_per_process):
    """One training step of the tiny model (GroupNorm, no BatchNorm) through the DDP wrapper on this
    process's share of 4 fixed images; rank r saves its gradients and the image ids its loader
    gives."""
    import torch
    from detectron2.modeling import build_model
    from detectron2.utils import comm

    from detectron2.engine.defaults import create_ddp_model
    from tests.utils.models import gfocal_cfg, random_input

    torch.manual_seed(0)
    model = build_model(gfocal_cfg(tiny=True)).train()
    g = torch.Generator().manual_seed(1)
    batch = [random_input(g, 64, 64, 3, 3) for _ in range(4)]
    rank = comm.get_rank()
    mine = batch[rank * images_per_process : (rank + 1) * images_per_process]
    ddp = create_ddp_model(model, broadcast_buffers=False)
    losses = ddp(mine)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.save(
        {"grads": grads, "losses": {k: v.detach() for k, v in losses.items()}},
        os.path.join(out_dir, f"grads_rank{rank}.pth"),
    )


def hanging_worker(out_dir):
    """Logs to OUTPUT_DIR/log.txt[.rankN] as training does, then blocks: rank 0 in a collective
    that rank 1 never joins, rank 1 in a sleep."""
    from detectron2.utils import comm
    from detectron2.utils.logger import setup_logger

    rank = comm.get_rank()
    setup_logger(out_dir, distributed_rank=rank, name="hang").info("rank %d is about to hang", rank)
    if rank == 0:
        comm.synchronize()
    else:
        time.sleep(3600)


def launch_workers(worker, num_processes, *args):
    """``worker(*args)`` in ``num_processes`` CPU processes (for ``python -c``: an entry point)."""
    from gfocalv2 import compat

    compat.apply()
    from gfocalv2.engine.launch import launch

    launch(worker, num_processes, dist_url="auto", args=args, device="cpu")


_dump_stacks_on_sigusr1()  # the harness, its workers (spawned: they import it) and the tests

if __name__ in ("__main__", "__mp_main__"):  # an entry point, in the launcher and its workers
    from gfocalv2 import compat  # (spawned: they import it first, as train_net.py)

    compat.apply()  # the fixes before anything imports Detectron2

if __name__ == "__main__":
    from gfocalv2.engine import workflow_argument_parser
    from gfocalv2.engine.launch import launch_from_args

    launch_from_args(train_main, workflow_argument_parser().parse_args())
