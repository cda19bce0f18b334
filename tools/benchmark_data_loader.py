#!/usr/bin/env python
"""Training data loader at COCO scale: gfocalv2's ``build_resumable_train_loader(cfg)`` (what
``gfocalv2.engine.Trainer.build_train_loader`` builds) against Detectron2's
``build_detection_train_loader(cfg)`` (``DefaultTrainer.build_train_loader``), on the same
config and the same COCO-train-sized synthetic set.

Each loader runs in a fresh process (``--rounds`` times, in the order D2, ours, ours, D2, ...,
so that both see the same machine load), which builds the loader from the registered dataset
(``--register-coco``-style: json + image folder), takes ``--batches`` batches of
``--batch-size`` images with ``--workers`` DataLoader workers, and records:

* the time to the first batch (from the call that builds the loader to the first batch:
  json loading, checks, serialization, worker start, first images);
* the PSS (proportional set size, ``/proc/PID/smaps_rollup``) of the main process and of each
  worker, after the first batch and every ``--sample-every`` batches; a worker that copies
  the pages it reads grows, one that shares them with the main process stays flat;
* the load average (``/proc/loadavg``) at each sample.

Printed: per loader, the medians over rounds, then ours / Detectron2's. The config is
``configs/COCO-Detection/gfocalv2_R_50_FPN_1x.yaml`` with small input sizes (the images are
tiny: the loaders' own work is measured, not image decoding) and ``--opts``.

    python tools/make_coco_sized_dataset.py /tmp/coco_sized        # once: 118,287 images
    python tools/benchmark_data_loader.py /tmp/coco_sized          # 3000 batches of 8, 2 rounds
    python tools/benchmark_data_loader.py /tmp/small --make --images 2000 --batches 200

``--make`` generates the set first if ``DIR/train.json`` does not exist.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

LOADERS = ("detectron2", "gfocalv2")
CONFIG = os.path.join(ROOT, "configs", "COCO-Detection", "gfocalv2_R_50_FPN_1x.yaml")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="folder with train.json and images/ (make_coco_sized_dataset)")
    parser.add_argument("--make", action="store_true", help="generate the set if it is missing")
    parser.add_argument("--images", type=int, default=118287, help="with --make")
    parser.add_argument("--annotations", type=int, default=860001, help="with --make")
    parser.add_argument("--batches", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each loader")
    parser.add_argument("--sample-every", type=int, default=100, help="batches between samples")
    parser.add_argument("--min-size", type=int, default=48, help="INPUT.MIN_SIZE_TRAIN")
    parser.add_argument("--max-size", type=int, default=64, help="INPUT.MAX_SIZE_TRAIN")
    parser.add_argument("--only", choices=LOADERS, help="run one loader only")
    parser.add_argument(
        "--before",
        metavar="TREE",
        help="also run gfocalv2's loader from this source tree (e.g. an older commit's "
        "`git archive`), as 'before'",
    )
    parser.add_argument("--json-out", help="write every run's samples to this file")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides")
    parser.add_argument("--child", choices=LOADERS, help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- /proc readings
def pss_mib(pid):
    """(PSS, anonymous RSS, private dirty) of a process in MiB from /proc/PID/smaps_rollup, or
    None if it is gone. PSS: each page divided by the number of processes mapping it;
    anonymous: the process's data (heap), shared with forked children or not; private dirty:
    pages written by this process only (a worker's copied pages)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = {}
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                    fields[parts[0][:-1]] = int(parts[1])
    except OSError:
        return None
    return (
        fields.get("Pss", 0) / 1024,
        fields.get("Anonymous", 0) / 1024,
        fields.get("Private_Dirty", 0) / 1024,
    )


def children(pid):
    """PIDs whose parent is ``pid`` (the DataLoader's worker processes)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # the command may contain spaces and parentheses: the ppid follows the last ")"
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(name))
    return sorted(out)


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


# --------------------------------------------------------------------------- one run (child)
def run_child(args):
    if args.src:  # the gfocalv2 package of another tree
        sys.path.insert(0, args.src)
    from gfocalv2 import compat

    compat.apply()  # the fixes before Detectron2 is imported (an entry point)
    from detectron2.data import build_detection_train_loader

    from gfocalv2.data.loader import build_resumable_train_loader
    from gfocalv2.engine import build_cfg

    opts = [
        "DATASETS.TRAIN", "('bench_train',)",
        "DATASETS.TEST", "()",
        "SOLVER.IMS_PER_BATCH", str(args.batch_size),
        "DATALOADER.NUM_WORKERS", str(args.workers),
        "INPUT.MIN_SIZE_TRAIN", f"({args.min_size},)",
        "INPUT.MAX_SIZE_TRAIN", str(args.max_size),
        "MODEL.DEVICE", "cpu",
        "SEED", "0",
        *args.opts,
    ]  # fmt: skip
    data = args.data
    register = [("bench_train", os.path.join(data, "train.json"), os.path.join(data, "images"))]
    cfg = build_cfg(CONFIG, opts, register_coco=register)
    me = os.getpid()
    samples = []

    def sample(batch, t):
        workers = [(pid, pss_mib(pid)) for pid in children(me)]
        samples.append(
            {
                "batch": batch,
                "seconds": round(t, 3),
                "main": pss_mib(me),
                "workers": {str(pid): m for pid, m in workers if m is not None},
                "loadavg": loadavg(),
            }
        )

    t0 = time.perf_counter()
    if args.child == "gfocalv2":
        loader = build_resumable_train_loader(cfg)
    else:
        loader = build_detection_train_loader(cfg)
    built = time.perf_counter() - t0
    it = iter(loader)
    batch = next(it)
    first = time.perf_counter() - t0
    assert len(batch) == args.batch_size, len(batch)
    sample(1, first)
    for b in range(2, args.batches + 1):
        batch = next(it)
        if b % args.sample_every == 0 or b == args.batches:
            sample(b, time.perf_counter() - t0)
    total = time.perf_counter() - t0
    print(
        "RESULT "
        + json.dumps(
            {
                "loader": args.child,
                "gfocalv2": os.path.dirname(os.path.dirname(compat.__file__)),
                "build_s": built,
                "first_batch_s": first,
                "total_s": total,
                "batches": args.batches,
                "samples": samples,
            }
        ),
        flush=True,
    )
    os._exit(0)  # do not wait for the workers' orderly shutdown


# --------------------------------------------------------------------------- summary (parent)
def summarize(run):
    s = run["samples"]
    first, last = s[0], s[-1]
    main = [x["main"][0] for x in s]
    worker_first = {pid: m[0] for pid, m in first["workers"].items()}
    growth = [last["workers"][p][0] - v for p, v in worker_first.items() if p in last["workers"]]
    dirty = [
        last["workers"][p][2] - m[2] for p, m in first["workers"].items() if p in last["workers"]
    ]
    return {
        "first_batch_s": run["first_batch_s"],
        "build_s": run["build_s"],
        "batches_per_s": (run["batches"] - 1) / max(run["total_s"] - run["first_batch_s"], 1e-9),
        "main_first_mib": main[0],
        "main_median_mib": statistics.median(main),
        "main_anon_mib": statistics.median(x["main"][1] for x in s),
        "main_max_mib": max(main),
        "worker_first_mib": statistics.median(worker_first.values()) if worker_first else 0.0,
        "worker_last_mib": statistics.median(m[0] for m in last["workers"].values())
        if last["workers"]
        else 0.0,
        "worker_growth_mib": max(growth) if growth else 0.0,
        "worker_dirty_growth_mib": max(dirty) if dirty else 0.0,
        "loadavg": statistics.median(x["loadavg"][0] for x in s),
    }


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    json_path = os.path.join(args.data, "train.json")
    if not os.path.isfile(json_path):
        if not args.make:
            sys.exit(
                f"{json_path} does not exist: generate it (--make, or "
                "tools/make_coco_sized_dataset.py)"
            )
        from make_coco_sized_dataset import make_dataset  # beside this script, on sys.path

        print(f"Generating {args.images} images under {args.data} ...", flush=True)
        _, _, stats = make_dataset(args.data, args.images, args.annotations)
        print(
            f"  {stats['annotations']} annotations, json {stats['json_MiB']:.0f} MiB, "
            f"{stats['seconds']:.0f} s"
        )
    variants = [(name, name, None) for name in ([args.only] if args.only else LOADERS)]
    if args.before:
        variants.append(("before", "gfocalv2", os.path.abspath(args.before)))
    order = []
    for r in range(args.rounds):
        order += variants if r % 2 == 0 else variants[::-1]
    passthrough = [
        "--batches", str(args.batches), "--batch-size", str(args.batch_size),
        "--workers", str(args.workers), "--sample-every", str(args.sample_every),
        "--min-size", str(args.min_size), "--max-size", str(args.max_size),
    ]  # fmt: skip
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.batches} "
        f"batches of {args.batch_size}, {args.workers} workers; order "
        f"{[label for label, _, _ in order]}",
        flush=True,
    )
    runs = {label: [] for label, _, _ in variants}
    t_start = time.time()
    for label, child, src in order:
        cmd = [sys.executable, os.path.abspath(__file__), args.data, "--child", child, *passthrough]
        if src:
            cmd += ["--src", src]
        if args.opts:
            cmd += ["--opts", *args.opts]
        before = loadavg()
        env = dict(os.environ, PYTHONPATH=src or ROOT)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n")
            sys.exit(f"the {label} run failed (exit status {proc.returncode})")
        run = json.loads(lines[-1][len("RESULT ") :])
        run["loadavg_before"] = before
        runs[label].append(run)
        s = summarize(run)
        print(
            f"  {label:10s} first batch {s['first_batch_s']:5.1f} s (built in "
            f"{s['build_s']:5.1f} s), {s['batches_per_s']:5.1f} batches/s; main PSS "
            f"{s['main_first_mib']:4.0f} MiB at the first batch, median {s['main_median_mib']:4.0f}"
            f" (anonymous {s['main_anon_mib']:4.0f}); worker PSS {s['worker_first_mib']:4.0f} -> "
            f"{s['worker_last_mib']:4.0f} MiB (growth {s['worker_growth_mib']:+.0f}); load "
            f"{before[0]:.2f} before, median {s['loadavg']:.2f}; {run['total_s']:.0f} s",
            flush=True,
        )
    print(f"\nAll runs: {time.time() - t_start:.0f} s. Medians over {args.rounds} round(s):")
    keys = [
        ("first_batch_s", "time to first batch, s", "{:.1f}"),
        ("main_first_mib", "main PSS at first batch, MiB", "{:.0f}"),
        ("main_median_mib", "main PSS, median over the run, MiB", "{:.0f}"),
        ("main_anon_mib", "main anonymous RSS, median, MiB", "{:.0f}"),
        ("worker_first_mib", "worker PSS after 1st batch, MiB", "{:.0f}"),
        ("worker_last_mib", f"worker PSS after {args.batches} batches, MiB", "{:.0f}"),
        ("worker_growth_mib", "worker PSS growth (max over workers), MiB", "{:+.0f}"),
        ("worker_dirty_growth_mib", "worker private-dirty growth (max), MiB", "{:+.0f}"),
        ("batches_per_s", "batches/s after the first", "{:.1f}"),
        ("loadavg", "load average (median of samples)", "{:.2f}"),
    ]
    med = {
        label: {k: statistics.median(summarize(r)[k] for r in rs) for k, _, _ in keys}
        for label, rs in runs.items()
    }
    labels = list(runs)
    ratios = [x for x in labels if x != "detectron2"] if "detectron2" in runs else []
    header = f"{'':42s}" + "".join(f"{n:>12s}" for n in labels)
    print(header + "".join(f"{r + '/D2':>16s}" for r in ratios))
    for k, label, fmt in keys:
        row = f"{label:42s}" + "".join(f"{fmt.format(med[n][k]):>12s}" for n in labels)
        for r in ratios:
            ok = "growth" not in k and k != "loadavg" and med["detectron2"][k]
            row += f"{med[r][k] / med['detectron2'][k]:>16.2f}" if ok else f"{'':>16s}"
        print(row)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
