"""Speed of GFocalV2 against Detectron2's own dense detectors, measured side by side.

    python -m gfocalv2.benchmark --config-file configs/COCO-Detection/gfocalv2_R_50_FPN_1x.yaml \\
        --task inference --num-iter 5 --compare retinanet,fcos,gfl --input-size 800 1333

Tasks:

* ``inference``: per-image latency at batch ``--batch-size`` (default 1) of
  ``model.eval()`` under ``torch.no_grad()``, split into preprocess / backbone (+FPN) /
  head / postprocess (score ranking, decode, NMS, rescaling to the input size).
* ``train``: one training iteration (forward, backward, SGD step) on synthetic images
  with ``--num-gt`` random ground-truth boxes each, split into backbone+head forward,
  targets (anchor labelling: ATSS for GFocal), losses forward, losses backward (down to
  the head outputs), backbone+head backward, optimizer step.
* ``data``: time per batch of Detectron2's training data loader over
  ``DATASETS.TRAIN`` (no model).

``--compare`` adds models built with the *same* ResNet (depth, norm, frozen stages, stride
placement), FPN channels, tower depth, number of classes and input:

* ``retinanet``: Detectron2's model-zoo ``COCO-Detection/retinanet_R_50_FPN_1x.yaml``;
* ``fcos``: Detectron2's model-zoo LazyConfig ``COCO-Detection/fcos_R_50_FPN_1x.py``;
* ``gfl``: this config with ``MODEL.GFOCAL.DGQP_ENABLED False`` (GFLV1);
* ``gfocalv2``: this config with the DGQP on.

All models get random weights (or ``MODEL.WEIGHTS`` for the config's own model). After
``--warmup`` untimed rounds, every round runs each model once, in an order that rotates
from round to round, so that the machine's drift (other jobs on a shared CPU, thermal
state) reaches every model alike. Reported: median, min, max and interquartile range of
the per-iteration time, and for every compared model the ratio of *our* time to its
time, as the median of the per-round ratios (paired, robust to drift).

Random weights put no score above the detection threshold, which would make
post-processing look free. ``--detections K`` (default 1000) therefore replaces each
model's classification logits by fixed synthetic ones in which ``K`` (location, class)
pairs per image score in [0.1, 0.95] and all others ~3e-4, so every model's
post-processing ranks, decodes and NMS-es a realistic number of candidates (the same
number for every model). ``--detections 0`` keeps the raw random-weight outputs.

Inference optimizations (``--optimize``, inference only): ``ours`` (the default) runs our
model the way the predictor, the demo, the exporter and evaluation run it, with the exact
rewrites ``TEST.FOLD_BATCHNORM`` / ``TEST.MEMORY_FORMAT`` of the config (see
``gfocalv2/modeling/inference_optimization.py``), and Detectron2's models the way Detectron2
runs them; ``all`` applies the same rewrites to every model (like for like); ``none`` to
none.

Other options: ``--amp`` (autocast: bfloat16 on CPU, float16 on CUDA), ``--channels-last``
(every model in NHWC), ``--flops`` (GFLOPs of each model's backbone and head, counted once,
untimed), ``--json FILE`` (the summary). On a CPU shared with other jobs use
``--threads 1 --timer cpu``: several OpenMP threads on a contended core wait at every
barrier for the preempted one (runs become several times slower and erratic), and the
process CPU time leaves out the time spent waiting for a core.

Code: :mod:`.models` builds the compared models (Detectron2's from
:mod:`gfocalv2.modeling.baselines`), :mod:`.synthetic` the synthetic batches and logits,
:mod:`.timing` times the stages (inference, training with the split backward pass, the data
loader) and counts FLOPs, :mod:`.report` turns the times into statistics and the report,
:mod:`.cli` is the command line (``python -m gfocalv2.benchmark``, ``gfocalv2-benchmark``).
"""

from .. import compat

# an entry point (python -m gfocalv2.benchmark, gfocalv2-benchmark):
# the fixes come before anything imports Detectron2
compat.apply()

from .cli import get_parser, main
from .models import (
    KNOWN_MODELS,
    OUR_MODELS,
    apply_inference_optimizations,
    build_models,
    use_channels_last,
)
from .report import format_report, summarize
from .synthetic import SyntheticLogits, add_synthetic_logits, synthetic_batch
from .timing import (
    Stopwatch,
    benchmark_data,
    count_flops,
    inference_step,
    run_benchmark,
    split_backward,
    train_step,
)

__all__ = [
    "main",
    "get_parser",
    "build_models",
    "run_benchmark",
    "format_report",
    "summarize",
    "KNOWN_MODELS",
    "OUR_MODELS",
    "apply_inference_optimizations",
    "use_channels_last",
    "synthetic_batch",
    "SyntheticLogits",
    "add_synthetic_logits",
    "Stopwatch",
    "inference_step",
    "train_step",
    "split_backward",
    "count_flops",
    "benchmark_data",
]
