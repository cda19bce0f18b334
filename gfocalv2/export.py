r"""Export GFocalV2 / GFL inference for deployment, with any input size, and check it.

    python -m gfocalv2.export --config-file configs/COCO-Detection/gfocalv2_R_50_FPN_1x.yaml \
        --format onnx --output exported/ --sample-image img.jpg --opts MODEL.WEIGHTS model.pth

Formats:

* ``onnx``: ``DIR/model.onnx``, exported with PyTorch's current exporter
  (``torch.onnx.export(..., dynamo=True)``: ``torch.export`` + onnxscript). Run it with
  onnxruntime, or with :class:`gfocalv2.runtime.OnnxPredictor` (no torch, no Detectron2).
* ``pt2``: ``DIR/model.pt2``, the ``torch.export`` program itself (``torch.export.load``;
  ``gfocalv2.compat.apply()`` then ``import gfocalv2.modeling.deploy`` first, which registers the
  graph's NMS operator
  ``gfocalv2::class_wise_nms``; ``import gfocalv2`` alone does not). TorchScript is not
  offered: ``torch.jit`` is deprecated, and a traced graph is frozen at one input size.

The graph (:class:`gfocalv2.modeling.deploy.DeployableGFocalV2`) takes two inputs:
``image``, a float32 ``(1, 3, H, W)`` tensor of raw pixel values in ``INPUT.FORMAT`` order,
already resized as at test time (``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)``), of any
height and width from 1 to 8192 (a ``.pt2`` program: from the coarsest level's stride + 1, 129
with P7, 33 with P5; see :func:`min_input_size`); and
``score_threshold``, a float32 scalar (the config's ``MODEL.GFOCAL.SCORE_THRESH_TEST`` is in
the metadata). Normalization, padding to the backbone's size divisibility, anchors, the
network, per-level top-k, decoding, clipping and class-wise NMS are inside. Outputs:
``boxes`` (D, 4) XYXY in the input's pixels, ``scores`` (D,), ``classes`` (D,) int64,
D <= ``DETECTIONS_PER_IMAGE``, by decreasing score.

The ONNX file's metadata (``metadata_props``) carries what a deployer needs:
``gfocalv2.class_names`` (JSON list), ``gfocalv2.input_format``, ``gfocalv2.min_size_test``,
``gfocalv2.max_size_test``, ``gfocalv2.resize_backend``, ``gfocalv2.score_threshold``,
``gfocalv2.size_divisibility``, ``gfocalv2.min_input_size``, ``gfocalv2.architecture``,
``gfocalv2.version`` and ``gfocalv2.config`` (the full config, YAML).

The check after export runs the exported graph and the PyTorch model (as loaded, without the
inference rewrites) on the sample image at three sizes (as at test time, then portrait and
landscape sizes that are not multiples of 32; for ONNX also a strip below the coarsest stride,
as an image of extreme aspect ratio becomes) and on every ``--check-images`` file, and
compares boxes, scores and classes. It compares real detections: when the model finds none
above its score threshold on an image (random weights), that image is compared at the
threshold that keeps its 300 best (location, class) candidates instead, and the report says
so. Exit status 1 if any comparison fails.
"""

import argparse
import json
import logging
import os
import sys
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from . import compat

# an entry point (python -m gfocalv2.export, gfocalv2-export):
# the fixes come before anything imports Detectron2
compat.apply()

from .engine.arguments import (
    add_config_file_argument,
    add_opts_argument,
    add_register_coco_argument,
)
from .modeling.deploy import DeployableGFocalV2

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "export_onnx",
    "export_program",
    "export_metadata",
    "load_runner",
    "pytorch_detections",
    "compare_detections",
    "check_sizes",
    "min_input_size",
    "main",
]

logger = logging.getLogger("gfocalv2.export")

INPUT_NAMES = ("image", "score_threshold")
OUTPUT_NAMES = ("boxes", "scores", "classes")
#: The largest height and width the exported graph accepts; the smallest: :func:`min_input_size`.
MAX_SIZE = 8192
#: Candidates kept for the check when the model detects nothing at its own threshold.
CHECK_CANDIDATES = 300


def min_input_size(model: nn.Module, fmt: str = "onnx") -> int:
    """The smallest height and width the exported graph of ``model`` takes.

    ONNX (``fmt`` "onnx"): 1, every size the PyTorch model takes. ``torch.export`` traces with
    dimensions of at least 2 and adds guards where a size-1 dimension would change strides or
    contiguity, not values; the ONNX graph keeps none of these guards, and it gives the model's
    detections at any size (tested down to 1 pixel, and below the coarsest stride, where the
    coarsest level has a single row or column).

    A ``torch.export`` program (``fmt`` "pt2") checks its guards when called: its coarsest level
    (e.g. P7, stride 128) must have at least 2 locations per side, so it takes sizes from the
    coarsest stride + 1 (129 for P3-P7)."""
    if fmt == "onnx":
        return 1
    return int(max(model.anchor_generator.strides)) + 1


def _dynamic_shapes(min_size: int):
    # torch.export's dynamic dimensions start at 2 (0 and 1 are specialized)
    height = torch.export.Dim("height", min=max(2, min_size), max=MAX_SIZE)
    width = torch.export.Dim("width", min=max(2, min_size), max=MAX_SIZE)
    return {"image": {2: height, 3: width}, "score_threshold": None}


def _example_inputs(deployable: DeployableGFocalV2, image: Tensor):
    return (image, torch.tensor(deployable.score_threshold, dtype=torch.float32))


def _nms_to_onnx(boxes, scores, score_threshold, iou_threshold: float, max_per_class: int):
    """``gfocalv2::class_wise_nms`` as ONNX ``NonMaxSuppression`` (batch of one image)."""
    from onnxscript import opset18 as op

    return op.NonMaxSuppression(
        op.Unsqueeze(boxes, op.Constant(value_ints=[0])),
        op.Unsqueeze(scores, op.Constant(value_ints=[0])),
        op.Constant(value_ints=[max_per_class]),
        op.Constant(value_floats=[iou_threshold]),
        op.Reshape(score_threshold, op.Constant(value_ints=[1])),
    )


def export_metadata(cfg, class_names: Sequence[str], model: nn.Module) -> dict:
    """The ``gfocalv2.*`` metadata of an exported model (see the module doc), as strings."""
    import gfocalv2

    g = cfg.MODEL.GFOCAL
    return {
        "gfocalv2.class_names": json.dumps(list(class_names)),
        "gfocalv2.input_format": cfg.INPUT.FORMAT,
        "gfocalv2.min_size_test": str(cfg.INPUT.MIN_SIZE_TEST),
        "gfocalv2.max_size_test": str(cfg.INPUT.MAX_SIZE_TEST),
        "gfocalv2.resize_backend": cfg.INPUT.RESIZE_BACKEND,
        "gfocalv2.score_threshold": repr(float(g.SCORE_THRESH_TEST)),
        "gfocalv2.size_divisibility": str(model.backbone.size_divisibility),
        "gfocalv2.min_input_size": str(min_input_size(model, "onnx")),
        "gfocalv2.architecture": "GFocalV2" if g.DGQP_ENABLED else "GFL",
        "gfocalv2.version": gfocalv2.__version__,
        "gfocalv2.config": cfg.dump(),
    }


def export_onnx(model: nn.Module, image: Tensor, path: str, metadata: Optional[dict] = None):
    """Export ``model`` (a ``GFocalV2``, eval mode) to ONNX at ``path`` with dynamic height and
    width, ``image`` (1, 3, H, W) being an example input; ``metadata`` goes into the file's
    ``metadata_props``. Returns ``path``."""
    import onnx

    deployable = DeployableGFocalV2(model)
    with torch.no_grad():
        program = torch.onnx.export(
            deployable,
            _example_inputs(deployable, image),
            dynamo=True,
            dynamic_shapes=_dynamic_shapes(min_input_size(model, "onnx")),
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            custom_translation_table={torch.ops.gfocalv2.class_wise_nms.default: _nms_to_onnx},
            verbose=False,
        )
    proto = program.model_proto
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, path)
    return path


def export_program(model: nn.Module, image: Tensor, path: str) -> str:
    """Export ``model`` as a ``torch.export`` program (``.pt2``) with dynamic height and width."""
    deployable = DeployableGFocalV2(model)
    with torch.no_grad():
        program = torch.export.export(
            deployable,
            _example_inputs(deployable, image),
            dynamic_shapes=_dynamic_shapes(min_input_size(model, "pt2")),
        )
    torch.export.save(program, path)
    return path


def load_runner(path: str):
    """A callable ``(image (1, 3, H, W) tensor, score_threshold float) -> (boxes, scores,
    classes)`` for an exported file (``.onnx``: onnxruntime on CPU; ``.pt2``: torch.export)."""
    if path.endswith(".onnx"):
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

        def run_onnx(image: Tensor, score_threshold: float):
            feeds = {
                "image": image.detach().cpu().numpy().astype(np.float32),
                "score_threshold": np.asarray(score_threshold, dtype=np.float32),
            }
            return tuple(torch.from_numpy(o) for o in session.run(list(OUTPUT_NAMES), feeds))

        return run_onnx
    module = torch.export.load(path).module()

    def run_program(image: Tensor, score_threshold: float):
        with torch.no_grad():
            return tuple(t.cpu() for t in module(image, torch.tensor(score_threshold)))

    return run_program


def pytorch_detections(
    model: nn.Module, image: Tensor, score_threshold: Optional[float] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """The model's own inference (``model([{"image": ...}])``) on a (1, 3, H, W) image, at
    ``score_threshold`` (default: the model's)."""
    saved = model.test_score_thresh
    if score_threshold is not None:
        model.test_score_thresh = score_threshold
    try:
        with torch.no_grad():
            inst = model([{"image": image[0]}])[0]["instances"].to("cpu")
    finally:
        model.test_score_thresh = saved
    return inst.pred_boxes.tensor, inst.scores, inst.pred_classes


def candidate_threshold(model: nn.Module, image: Tensor, num: int = CHECK_CANDIDATES) -> float:
    """A score threshold that keeps about the ``num`` best (location, class) candidates of
    ``image``: for checking an export on real detections when the model has none above its own
    threshold (random weights put every score near the prior, 0.01)."""
    scores = []
    hook = model.head.register_forward_hook(lambda m, i, out: scores.append(out))
    try:
        with torch.no_grad():
            model([{"image": image[0]}])
    finally:
        hook.remove()
    cls_logits, _, quality_logits = scores[0]
    joint = []
    for level, cls in enumerate(cls_logits):
        quality = quality_logits[level] if model.dgqp_enabled else None
        joint.append(
            model.joint_scores(
                cls.permute(0, 2, 3, 1).reshape(-1, cls.shape[1]),
                None if quality is None else quality.permute(0, 2, 3, 1).reshape(-1, 1),
            ).flatten()
        )
    joint = torch.cat(joint)
    k = min(num, joint.numel())
    return float(joint.topk(k).values[-1]) * 0.999


def compare_detections(
    expected: Sequence[Tensor],
    actual: Sequence[Tensor],
    box_atol: float = 0.05,
    score_atol: float = 1e-4,
) -> Optional[str]:
    """None if two (boxes, scores, classes) results agree, else what differs first.

    Both must have as many detections; each expected detection must have its own exported
    detection of the same class with every box coordinate within ``box_atol`` pixels and the
    score within ``score_atol`` (detections are matched, so that two detections whose scores
    tie within float rounding may come in either order)."""
    (eb, es, ec), (ab, as_, ac) = expected, actual
    if len(eb) != len(ab):
        return f"{len(eb)} detections expected, {len(ab)} exported"
    if len(eb) == 0:
        return None
    box_err = (eb.float()[:, None] - ab.float()[None]).abs().amax(dim=2)  # (D, D)
    score_err = (es.float()[:, None] - as_.float()[None]).abs()
    same_class = ec.long()[:, None] == ac.long()[None]
    close = same_class & (box_err <= box_atol) & (score_err <= score_atol)
    taken = torch.zeros(len(ab), dtype=torch.bool)
    for i in range(len(eb)):  # at most DETECTIONS_PER_IMAGE, in a check
        free = (close[i] & ~taken).nonzero()
        if len(free) == 0:
            j = int(torch.where(same_class[i], box_err[i] + score_err[i], torch.inf).argmin())
            if not bool(same_class[i, j]):
                return f"detection {i} (class {int(ec[i])}): no exported detection of its class"
            return (
                f"detection {i} (class {int(ec[i])}, score {float(es[i]):.4f}): the closest "
                f"exported one differs by {float(box_err[i, j]):.3g} px (tolerance {box_atol}) and "
                f"{float(score_err[i, j]):.2e} in score (tolerance {score_atol})"
            )
        taken[free[0, 0]] = True
    return None


def check_sizes(height: int, width: int, min_size: int = 2, thin: int = 0) -> List[Tuple[int, int]]:
    """The sample's size, then a portrait and a landscape size that are not multiples of 32
    (odd), none below ``min_size``; with ``thin`` > 0 also a strip ``thin`` pixels high (an
    image of extreme aspect ratio after the test resize)."""
    short, long = sorted((height, width))

    def odd(v):
        return max(v, min_size) | 1

    portrait = (odd(long * 9 // 10), odd(short * 7 // 10))
    landscape = (odd(short * 3 // 5), odd(long * 4 // 5))
    if portrait[0] <= portrait[1]:  # a square sample at the minimum size
        portrait = (portrait[1] + 2, portrait[1])
    if landscape[1] <= landscape[0]:
        landscape = (landscape[0], landscape[0] + 2)
    sizes = [(height, width), portrait, landscape]
    if thin > 0:
        sizes.append((max(thin, min_size), odd(long)))
    return sizes


def _resized(image: Tensor, size: Tuple[int, int]) -> Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    resized = torch.nn.functional.interpolate(
        image, size=size, mode="bilinear", align_corners=False
    )
    return resized.round().clamp(0, 255)


# ----------------------------------------------------------------------------- CLI
def load_image(path: str, cfg) -> Tensor:
    """An image file as the test-time input: ``INPUT.FORMAT``, resized as the Predictor does
    (``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)`` sizes, ``INPUT.RESIZE_BACKEND`` pixels)
    -> (1, 3, H, W) float."""
    from detectron2.data.detection_utils import read_image

    from .data.mapper import SafeResizeShortestEdge
    from .data.transforms import resize_backend

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path} does not exist")
    img = read_image(path, format=cfg.INPUT.FORMAT)
    aug = SafeResizeShortestEdge(
        [cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST, backend=resize_backend(cfg)
    )
    img = aug.get_transform(img).apply_image(img)
    return torch.as_tensor(img.astype("float32").transpose(2, 0, 1))[None]


def class_names_for(cfg) -> List[str]:
    """The class names of the config's test (else training) dataset, if registered; else
    ``"0", "1", ...``."""
    from .data.datasets import get_thing_classes

    for name in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        try:
            classes = get_thing_classes(name)
        except Exception:  # noqa: BLE001  (files of a builtin dataset absent: not needed here)
            classes = None
        if classes and len(classes) == cfg.MODEL.GFOCAL.NUM_CLASSES:
            return list(classes)
    return [str(i) for i in range(cfg.MODEL.GFOCAL.NUM_CLASSES)]


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gfocalv2.export",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_file_argument(p)
    p.add_argument("--format", choices=("onnx", "pt2"), default="onnx")
    p.add_argument("--output", required=True, help="output directory (created if needed)")
    p.add_argument("--sample-image", default="", help="example image (resized as at test time)")
    p.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        default=(800, 1216),
        metavar=("H", "W"),
        help="size of a random sample image without --sample-image",
    )
    p.add_argument(
        "--check-images", nargs="*", default=[], help="more images (any size) to check on"
    )
    p.add_argument("--box-atol", type=float, default=0.05, help="pixels (default 0.05)")
    p.add_argument("--score-atol", type=float, default=1e-4)
    add_register_coco_argument(p)
    add_opts_argument(p)
    return p


def _check(reference, runner, images, args) -> int:
    failures = 0
    for name, image in images:
        threshold, note = reference.test_score_thresh, ""
        expected = pytorch_detections(reference, image)
        if len(expected[0]) == 0:
            threshold = candidate_threshold(reference, image)
            note = (
                f" (no detection above the model's threshold {reference.test_score_thresh}: "
                f"compared at {threshold:.4g}, its {CHECK_CANDIDATES} best candidates)"
            )
            expected = pytorch_detections(reference, image, threshold)
        actual = runner(image, threshold)
        problem = compare_detections(expected, actual, args.box_atol, args.score_atol)
        if problem is None and len(expected[0]) == 0:
            problem = "no detections to compare, even at a lowered threshold"
        status = "OK" if problem is None else f"MISMATCH: {problem}"
        logger.info(
            "%s %dx%d: %d detections%s, exported vs PyTorch: %s",
            name, image.shape[2], image.shape[3], len(expected[0]), note, status,
        )  # fmt: skip
        failures += problem is not None
    return failures


def _log_to_console():
    """This package's messages on the console (not those of the exporter's own libraries)."""
    package_logger = logging.getLogger("gfocalv2")
    if not any(getattr(h, "_gfocalv2_export", False) for h in package_logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[export] %(message)s"))
        handler._gfocalv2_export = True
        package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    _log_to_console()
    from detectron2.modeling import build_model

    from .checkpoint import load_weights
    from .engine import build_cfg
    from .modeling.inference_optimization import optimize_for_inference

    # exported on CPU; onnxruntime picks its own device
    opts = list(args.opts) + ["MODEL.DEVICE", "cpu"]
    cfg = build_cfg(args.config_file, opts, args.register_coco)
    if cfg.MODEL.META_ARCHITECTURE != "GFocalV2":
        raise SystemExit(
            f"error: gfocalv2.export exports GFocalV2 models; MODEL.META_ARCHITECTURE is "
            f"{cfg.MODEL.META_ARCHITECTURE}"
        )
    reference = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        load_weights(reference, cfg)  # missing/unreadable file, other architecture or classes
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting a randomly initialized model")
    # The exported graph is the optimized model (BatchNorms folded; the memory format is a
    # runtime matter, ONNX has none); the checks compare it with the model as loaded.
    import copy

    model = optimize_for_inference(copy.deepcopy(reference), cfg, memory_format="contiguous")

    if args.sample_image:
        image = load_image(args.sample_image, cfg)
    else:
        torch.manual_seed(0)
        image = torch.rand(1, 3, *args.input_size) * 255
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, f"model.{args.format}")
    start = time.perf_counter()
    if args.format == "onnx":
        metadata = export_metadata(cfg, class_names_for(cfg), model)
        export_onnx(model, image, path, metadata)
    else:
        export_program(model, image, path)
    logger.info(
        "wrote %s (%.1f MB) in %.0f s: input (1, 3, H, W) raw %s image of any size, H and W in "
        "[%d, %d]",
        path, os.path.getsize(path) / 1e6, time.perf_counter() - start, cfg.INPUT.FORMAT,
        min_input_size(model, args.format), MAX_SIZE,
    )  # fmt: skip

    runner = load_runner(path)
    name = os.path.basename(args.sample_image) if args.sample_image else "random sample"
    # for ONNX also a strip below the coarsest stride (its coarsest level: a single row)
    coarsest = int(max(model.anchor_generator.strides))
    thin = coarsest * 3 // 4 if args.format == "onnx" else 0
    sizes = check_sizes(*image.shape[2:], min_input_size(model, args.format), thin)
    images = [(name, _resized(image, size)) for size in sizes]
    images += [(p, load_image(p, cfg)) for p in args.check_images]
    failures = _check(reference, runner, images, args)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
