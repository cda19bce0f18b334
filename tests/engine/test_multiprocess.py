"""Two processes on the gloo backend (CPU), as `train_net.py --num-gpus 2` runs them without CUDA.

Every run is a subprocess with a timeout (its process group is killed past it), so a hang fails
instead of blocking. The model is the DigitScenes one (head on P3-P5, naiveSyncBN) at 64 px.
"""

import json
import os
import signal
import time

import pytest
import torch

from tests.utils.multiprocess import REPO, finish, one_step_worker, run, run_opts, start

# the module's reference run (a fixture) and a test's own runs
pytestmark = pytest.mark.timeout(600)

# Seconds for one run: a healthy one takes 10-40 s on 2 cores; the longest clean-up of the code
# is torch's 30 s between terminating a failed run's other workers and killing them.
TIMEOUT = 150


@pytest.fixture(scope="module")
def data(tiny_digits):
    return {split: list(tiny_digits[split]) for split in ("train", "val")}


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted 2-process run of 6 iterations, recording each process's batches."""
    out = tmp_path_factory.mktemp("mp_reference")
    code, log, _ = run(
        ["--num-gpus", "2", *run_opts(data, out)],
        TIMEOUT,
        env={"GFOCALV2_TEST_RECORD": str(out)},
        logs=out,
    )
    assert code == 0, log[-4000:]
    return out, log


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _same_weights(a, b):
    a, b = _state(a)["model"], _state(b)["model"]
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _predictions(out):
    with open(os.path.join(out, "inference", "coco_instances_results.json")) as f:
        return sorted(
            json.load(f), key=lambda p: (p["image_id"], -p["score"], p["category_id"], p["bbox"])
        )


def test_two_processes_train_with_checkpoints_from_rank_0_only(reference):
    out, log = reference
    assert "Starting 2 processes (gloo, 1 CPU thread(s) each)." in log
    main_log = open(out / "log.txt").read()
    other_log = open(out / "log.txt.rank1").read()
    assert "Saving checkpoint to" in main_log and "Saving checkpoint" not in other_log
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == [
        "model_0000002.pth",
        "model_0000005.pth",
        "model_final.pth",
    ]
    assert _state(out / "model_0000002.pth")["iteration"] == 2
    assert "copypaste: AP,AP50" in log  # evaluation gathered on rank 0
    assert (
        "TypedStorage" not in log and "Warning" not in log and "No CUDA runtime" not in log
    )  # a quiet console


def test_processes_see_disjoint_halves_of_the_one_process_batches(reference, data, tmp_path):
    out, _ = reference
    ranks = [json.load(open(out / f"batches_rank{r}.json")) for r in (0, 1)]
    code, log, _ = run(
        ["--num-gpus", "1", *run_opts(data, tmp_path, max_iter=3)],
        TIMEOUT,
        env={"GFOCALV2_TEST_RECORD": str(tmp_path)},
        logs=tmp_path,
    )
    assert code == 0, log[-4000:]
    single = json.load(open(tmp_path / "batches_rank0.json"))
    for it in ("0", "1", "2"):
        assert len(ranks[0][it]) == len(ranks[1][it]) == 2  # IMS_PER_BATCH 4 split over 2 processes
        assert not set(ranks[0][it]) & set(ranks[1][it])
        assert sorted(ranks[0][it] + ranks[1][it]) == sorted(single[it])


def test_one_step_on_two_processes_equals_one_process_on_all_images(tmp_path):
    """Frozen statistics (GroupNorm): gradients of 2 x 2 images (DDP averages them; num_pos and the
    box-loss weight sum are all-reduced) equal those of 1 x 4 images."""
    code, log, _ = run(
        [
            "-c",
            "import tests.utils.multiprocess as m; "
            f"m.launch_workers(m.one_step_worker, 2, {str(tmp_path)!r}, 2)",
        ],
        TIMEOUT,
        module=None,
    )
    assert code == 0, log[-4000:]
    two = _state(tmp_path / "grads_rank0.pth")["grads"]
    other = _state(tmp_path / "grads_rank1.pth")["grads"]
    assert all(
        torch.equal(two[k], other[k]) for k in two
    )  # DDP gave both processes the same gradients
    single = tmp_path / "single"
    single.mkdir()
    one_step_worker(str(single), 4)  # this process alone, all 4 images
    one = _state(single / "grads_rank0.pth")["grads"]
    assert set(one) == set(two) and len(one) > 10
    for name in one:
        scale = one[name].abs().max().clamp_min(1e-12)
        assert ((two[name] - one[name]).abs().max() / scale).item() < 1e-5, name


def test_a_hung_run_fails_with_every_process_stack_and_every_rank_log(tmp_path):
    """What a test sees when a multi-process run hangs: the launcher's and both workers' Python
    stacks, and each rank's log, then the processes are gone."""
    proc = start(
        [
            "-c",
            "import tests.utils.multiprocess as m; "
            f"m.launch_workers(m.hanging_worker, 2, {str(tmp_path)!r})",
        ],
        module=None,
    )
    _wait_for(tmp_path / "log.txt", "about to hang", proc)
    _wait_for(tmp_path / "log.txt.rank1", "about to hang", proc)
    with pytest.raises(AssertionError) as e:
        finish(proc, 5, logs=tmp_path)
    report = str(e.value)
    assert "did not finish within 5 s (hang?)" in report
    tail = report[-6000:]
    assert report.count("most recent call first") >= 3, tail  # the launcher and both workers
    assert "in hanging_worker" in report and "in synchronize" in report, tail  # rank 0: collective
    assert "rank 0 is about to hang" in report and "rank 1 is about to hang" in report
    assert f"{tmp_path / 'log.txt.rank1'} (end)" in report


def test_evaluation_gives_the_same_detections_with_one_and_two_processes(reference, data, tmp_path):
    """The evaluation at the end of the 2-process training against --eval-only in one process."""
    out, _ = reference
    weights = ["MODEL.WEIGHTS", str(out / "model_final.pth")]
    code, log, _ = run(
        ["--eval-only", "--num-gpus", "1", *run_opts(data, tmp_path), *weights], TIMEOUT
    )
    assert code == 0, log[-4000:]
    one, two = _predictions(tmp_path), _predictions(out)
    assert len(one) > 0 and one == two


def _wait_for(path, text, proc, timeout=TIMEOUT):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if os.path.exists(path) and text in open(path).read():
            return
        if proc.poll() is not None:  # collect its output with a time limit (no blocking read)
            code, out = finish(proc, 30)
            raise AssertionError(
                f"ended ({code}) before {text!r} appeared in {path}:\n{out[-4000:]}"
            )
        time.sleep(0.05)
    raise AssertionError(f"{text!r} did not appear in {path} within {timeout} s")


def test_sigterm_saves_a_checkpoint_and_resume_is_bit_exact(reference, data, tmp_path):
    """Preemption: SIGTERM to the launching process -> every process finishes its step, rank 0 saves
    it, all exit with 143 and no traceback; --resume then ends with the uninterrupted run's
    weights."""
    ref, _ = reference
    out = tmp_path / "run"
    # the processes agree on a stop every 2 iterations: after iteration 1, 3 or 5
    proc = start(["--num-gpus", "2", *run_opts(data, out, extra=["SOLVER.STOP_CHECK_PERIOD", "2"])])
    _wait_for(out / "log.txt", "Starting training from iteration 0", proc)
    proc.send_signal(signal.SIGTERM)
    code, log = finish(proc, TIMEOUT, logs=out)
    assert code == 128 + signal.SIGTERM, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    assert "Training stopped after iteration" in log and "Continue with --resume" in log
    last = open(out / "last_checkpoint").read().strip()
    stopped_at = int(last[len("model_") : -len(".pth")])
    assert stopped_at in (1, 3) and _state(out / last)["iteration"] == stopped_at
    assert not (out / "model_final.pth").exists() and "copypaste" not in log  # no evaluation

    code, log, _ = run(["--num-gpus", "2", "--resume", *run_opts(data, out)], TIMEOUT)
    assert code == 0, log[-4000:]
    assert f"Starting training from iteration {stopped_at + 1}" in log
    assert _same_weights(out / "model_final.pth", ref / "model_final.pth")


def test_non_finite_loss_on_one_process_stops_both_after_rank_0_saved(reference, data, tmp_path):
    """NaN losses in rank 1 alone: Detectron2's metrics gathering shows them to rank 0, which
    raises (before the update), saves the state after the previous iteration and exits; rank 1's
    next collective then fails at once, or the launcher ends it."""
    ref, _ = reference
    out = tmp_path / "run"
    code, log, seconds = run(
        ["--num-gpus", "2", *run_opts(data, out)],
        TIMEOUT,
        logs=out,
        env={"GFOCALV2_TEST_FAULT": "nan:1:3"},
    )
    assert code != 0
    assert "Loss became infinite or NaN at iteration=3!" in log
    saved = f"The state after iteration 2 is {out / 'model_0000002.pth'}."
    assert saved in log  # the error that ends the launcher says where the state is
    assert open(out / "last_checkpoint").read().strip() == "model_0000002.pth"
    assert _state(out / "model_0000002.pth")["iteration"] == 2
    assert _same_weights(out / "model_0000002.pth", ref / "model_0000002.pth")
    assert not (out / "model_final.pth").exists() and "copypaste" not in log
    assert seconds < 60  # not the 30-minute collective timeout


def test_failure_in_one_process_at_the_last_iteration(data, tmp_path):
    """An exception in rank 1 alone at the last iteration: the launcher reports it; rank 0's
    collective fails at once (its peer is gone), so it saves the state after the previous
    iteration under its own number, and no evaluation or model_final follows."""
    out = tmp_path / "run"
    code, log, seconds = run(
        ["--num-gpus", "2", *run_opts(data, out)],
        TIMEOUT,
        logs=out,
        env={"GFOCALV2_TEST_FAULT": "error:1:5"},
    )
    assert code != 0
    assert "injected failure on rank 1 at iteration 5" in log
    main_log = open(out / "log.txt").read()
    assert "Iteration 5 failed (RuntimeError). The state after iteration 4 was saved to" in main_log
    assert open(out / "last_checkpoint").read().strip() == "model_0000004.pth"
    assert _state(out / "model_0000004.pth")["iteration"] == 4
    assert not (out / "model_final.pth").exists()
    assert "Start inference" not in log + main_log and "copypaste" not in log
    assert seconds < 60


# the same launcher as train_net.py (tested above); kept out of make test for time
@pytest.mark.slow
def test_digit_scenes_script_on_two_processes(data, tmp_path):
    """projects/DigitScenes/train_digits.py --num-gpus 2: the same launcher; the summary comes
    from rank 0 once."""
    argv = ["--num-gpus", "2", "--num-vis", "0", *run_opts(data, tmp_path / "out", max_iter=2)[2:]]
    code, log, _ = run(argv, TIMEOUT, script="projects/DigitScenes/train_digits.py")
    assert code == 0, log[-4000:]
    assert log.count("DigitScenes training done") == 1 and "COCO bbox AP" in log
    assert (tmp_path / "out" / "model_final.pth").is_file()


# the same mechanism as a failing step (tested above); kept out of make test for time
@pytest.mark.slow
def test_evaluation_failing_in_one_process_during_training(data, tmp_path):
    """The periodic evaluation raises in rank 1 only: rank 0 (waiting to gather the results)
    stops at once too, after the finished iteration's state is saved."""
    out = tmp_path / "run"
    code, log, seconds = run(
        ["--num-gpus", "2", *run_opts(data, out, extra=["TEST.EVAL_PERIOD", "3"])],
        TIMEOUT,
        logs=out,
        env={"GFOCALV2_TEST_FAULT": "eval:1:2"},
    )
    assert code != 0
    assert "RuntimeError: injected evaluation failure on rank 1 after iteration 2" in log
    assert open(out / "last_checkpoint").read().strip() == "model_0000002.pth"
    assert _state(out / "model_0000002.pth")["iteration"] == 2
    assert not (out / "model_final.pth").exists()
    assert seconds < 60


def test_a_published_config_trains_on_two_processes_with_its_own_norm(data, tmp_path):
    """configs/COCO-Detection/gfocalv2_R_50_FPN_1x.yaml as users run it with --num-gpus 2: its
    R-50 with BNEval (statistics frozen, affine trained) and its GN head, only the size shrunk."""
    from tests.utils.workflow import tiny_opts

    config = os.path.join(REPO, "configs", "COCO-Detection", "gfocalv2_R_50_FPN_1x.yaml")
    opts = tiny_opts(tmp_path, "mp_train", "mp_val", max_iter=2)
    opts += ["SOLVER.IMS_PER_BATCH", "4", "MODEL.GFOCAL.NUM_CLASSES", "10", "SEED", "0"]
    opts += ["DATASETS.TEST", "()", "MODEL.FPN.OUT_CHANNELS", "64"]
    argv = ["--num-gpus", "2", "--config-file", config]
    argv += ["--register-coco", "mp_train", *data["train"], *opts]
    code, log, _ = run(argv, TIMEOUT, logs=tmp_path)
    assert code == 0, log[-4000:]
    assert "Starting 2 processes (gloo" in log and "MODEL.RESNETS.NORM" not in log
    assert "World size: 2" in open(tmp_path / "log.txt").read()
    state = _state(tmp_path / "model_final.pth")
    assert state["iteration"] == 1
    # BNEval: the backbone's running statistics are those it started with (none trained)
    assert torch.equal(
        state["model"]["backbone.bottom_up.res3.0.conv1.norm.running_var"], torch.ones(128)
    )


def test_two_jobs_on_one_machine_with_the_default_dist_url(data, tmp_path):
    """Two 2-process jobs at once on one machine, neither giving --dist-url: each meets its own
    workers (Detectron2's default is one fixed port per user, which the second job would find
    taken, or share)."""
    no_eval = ["DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0"]
    procs = [
        start(["--num-gpus", "2", *run_opts(data, tmp_path / j, max_iter=2, extra=no_eval)])
        for j in ("a", "b")
    ]
    for j, proc in zip(("a", "b"), procs):
        code, log = finish(proc, TIMEOUT, logs=tmp_path / j)
        assert code == 0, log[-4000:]
        assert (tmp_path / j / "model_final.pth").is_file()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _machine(data, out, rank, url, **kw):
    argv = ["--num-gpus", "1", "--num-machines", "2", "--machine-rank", str(rank)]
    return start(
        [*argv, "--dist-url", url, *run_opts(data, out, max_iter=3, ims_per_batch=2)], **kw
    )


def test_two_machines_on_one_host_train_together(data, tmp_path):
    """Two launchers, as on two machines (--num-machines 2, --machine-rank 0/1, one process
    each): one run of world size 2, saved by machine 0 only."""
    url = f"tcp://127.0.0.1:{_free_port()}"
    procs = [_machine(data, tmp_path / f"m{r}", r, url) for r in (0, 1)]
    results = [finish(p, TIMEOUT, logs=tmp_path / f"m{r}") for r, p in enumerate(procs)]
    for code, log in results:
        assert code == 0, log[-4000:]
    assert "machine 0 of 2: they wait for all 2 processes to join at " + url in results[0][1]
    assert "World size: 2" in open(tmp_path / "m0" / "log.txt").read()
    assert (tmp_path / "m0" / "model_final.pth").is_file()
    assert not list((tmp_path / "m1").glob("*.pth"))  # rank 1 saves nothing


def _read_until(proc, text, timeout):
    """What ``proc`` printed until ``text`` appeared (without blocking past ``timeout``)."""
    import select

    out, end = b"", time.monotonic() + timeout
    while text.encode() not in out and time.monotonic() < end and proc.poll() is None:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            out += os.read(proc.stdout.fileno(), 65536)
    return out.decode(errors="replace")


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read()
    except OSError:
        return ""


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _gone(pid, within):
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":  # a zombie has ended
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
def test_a_machine_whose_peer_never_comes_says_so_and_stops(data, tmp_path, stop):
    """Machine 0 alone: its launcher says what the process waits for; SIGTERM ends it at once
    (exit status 143, no traceback), and SIGKILL of the launcher does not leave its worker
    behind."""
    url = f"tcp://127.0.0.1:{_free_port()}"
    proc = _machine(data, tmp_path, 0, url)
    said = _read_until(proc, "processes to join at " + url, TIMEOUT)  # the launcher's line
    assert "machine 0 of 2: they wait for all 2 processes to join at " + url in said, said
    worker = None
    end = time.monotonic() + TIMEOUT
    while worker is None and time.monotonic() < end:  # the worker has started and waits
        kids = [k for k in _children(proc.pid) if "spawn_main" in _cmdline(k)]
        worker = kids[0] if kids else None
        time.sleep(0.2)
    assert worker is not None, finish(proc, 30)[1][-3000:]
    time.sleep(3)  # in the rendezvous (its imports done or not: either way it must stop)
    assert proc.poll() is None
    proc.send_signal(getattr(signal, stop))
    code, log = finish(proc, 30)
    if stop == "SIGTERM":
        assert code == 128 + signal.SIGTERM and "Traceback" not in log, said + log[-3000:]
    assert _gone(worker, within=10), f"worker {worker} outlived its launcher"
