"""Counting the tensor calls that force a host-device synchronization on a GPU
(``Tensor.item``, ``.tolist``, ``.cpu``, ``.numpy``, ``bool()``, ``float()``, ``int()``) during
training iterations, for this project's Trainer and Detectron2's DefaultTrainer alike.

Calls made by the data pipeline's own code (gfocalv2/data, detectron2/data, torch's data
loader) are not counted: their tensors (dataset indices, images before the model) are on the
CPU on every machine, so they never wait for a GPU.
"""

import contextlib
import os
import re
import sys
import time

import torch
from detectron2.engine import DefaultTrainer, HookBase

SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
_DATA_CODE = re.compile(r"(gfocalv2|detectron2|torch/utils)/data/")


@contextlib.contextmanager
def counting_syncs(counts):
    """Count each SYNCING call in ``counts`` (a dict) while ``counts["on"]`` is True."""
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def counted(name, fn):
        def wrapper(self, *args, **kwargs):
            if counts.get("on") and not _DATA_CODE.search(sys._getframe(1).f_code.co_filename):
                counts[name] = counts.get(name, 0) + 1
            return fn(self, *args, **kwargs)

        return wrapper

    for name, fn in originals.items():
        setattr(torch.Tensor, name, counted(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


class _Switch(HookBase):
    """Turns counting (and timing) on before iterations ``first..last`` and off after them: the
    first hook of the trainer starts, the last one stops, so whole iterations are counted."""

    def __init__(self, counts, first, last, start):
        self.counts, self.first, self.last, self.start = counts, first, last, start

    def before_step(self):
        if self.start and self.first <= self.trainer.iter <= self.last:
            self.counts["on"] = True
            self.counts.setdefault("seconds", []).append(time.perf_counter())

    def after_step(self):
        if not self.start and self.first <= self.trainer.iter <= self.last:
            self.counts["on"] = False
            started = self.counts["seconds"].pop()
            self.counts.setdefault("step_seconds", []).append(time.perf_counter() - started)


class Detectron2Trainer(DefaultTrainer):
    """Detectron2's DefaultTrainer as its own tools/train_net.py uses it: COCO evaluation."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        from detectron2.evaluation import COCOEvaluator

        return COCOEvaluator(dataset_name, output_dir=os.path.join(cfg.OUTPUT_DIR, "inference"))


def count_per_iteration(trainer_class, cfg, first, last):
    """Train ``cfg`` with ``trainer_class`` and return ``(calls per iteration by name, the
    iterations' seconds)`` over iterations ``first..last``."""
    from detectron2.utils.env import seed_all_rng

    seed_all_rng(cfg.SEED)
    counts = {}
    trainer = trainer_class(cfg)
    trainer.register_hooks([_Switch(counts, first, last, start=False)])
    trainer._hooks.insert(0, _Switch(counts, first, last, start=True))
    trainer._hooks[0].trainer = trainer
    trainer.resume_or_load(resume=False)
    with counting_syncs(counts):
        trainer.train()
    n = last - first + 1
    per_iteration = {name: counts.get(name, 0) / n for name in SYNCING}
    return per_iteration, counts["step_seconds"]
