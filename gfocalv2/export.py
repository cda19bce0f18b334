"""Export GFocalV2 / GFL inference to TorchScript (tracing) or ONNX, and check the exported
graph against the PyTorch model. The exported network has its BatchNorms folded into the
convolutions before it (``TEST.FOLD_BATCHNORM``; exact up to float rounding).

    python -m gfocalv2.export --config-file configs/COCO-Detection/gfocalv2_R_50_FPN_1x.yaml \\
        --format onnx --output exported/ --sample-image img.jpg --opts MODEL.WEIGHTS model_final.pth

The exported graph is :class:`ExportableDetector`: input one image as a float tensor
``(1, 3, H, W)`` of raw pixel values in ``INPUT.FORMAT`` channel order, already resized
(e.g. with ``ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)``);
normalization, padding to the backbone's size divisibility, the network, per-level top-k,
decoding, class-wise NMS (ONNX ``NonMaxSuppression``) and clipping are inside the graph.
Outputs: ``boxes`` (K, 4) XYXY in input-image pixels, ``scores`` (K,), ``classes`` (K,)
int64, K <= ``MODEL.GFOCAL.DETECTIONS_PER_IMAGE``, sorted by decreasing score — the same as
``model([{"image": image[0]}])[0]["instances"]``.

The graph is traced at the sample image's size (``--sample-image``, resized as at test
time, or a random image of ``--input-size``): anchors and the padding are constants of
that size, so feed images of exactly that size (resize/pad them the same way). After
export, both the exported graph (TorchScript with ``torch.jit.load``, ONNX with
onnxruntime) and the PyTorch model run on the sample image (and any ``--check-images``),
and the tool reports whether boxes, scores and classes agree within tolerance (exit
status 1 if not).
"""

import argparse
import contextlib
import copy
import logging
import os
import sys
import warnings
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import ImageList
from torch import Tensor, nn

from .engine.arguments import (
    add_config_file_argument,
    add_opts_argument,
    add_register_coco_argument,
)
from .modeling.inference_optimization import optimize_for_inference

__all__ = [
    "ExportableDetector",
    "export_torchscript",
    "export_onnx",
    "load_runner",
    "compare_detections",
    "main",
]

logger = logging.getLogger("gfocalv2.export")

OUTPUT_NAMES = ("boxes", "scores", "classes")


class ExportableDetector(nn.Module):
    """A traceable GFocalV2: ``(1, 3, H, W)`` raw image -> (boxes, scores, classes) tensors.

    Runs the model's own preprocessing, backbone, head and ``forward_inference`` (so
    nothing is re-implemented here), plus the empty-box filter of Detectron2's
    ``detector_postprocess``; the output is in the input image's coordinates.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # exporters restore the wrapper's mode afterwards: keep it (and the model) in eval
        self.eval()

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        model = self.model
        _, _, H, W = image.shape
        x = (image - model.pixel_mean) / model.pixel_std
        div = model.backbone.size_divisibility
        if div > 1:  # as ImageList.from_tensors: zero padding right and bottom
            x = F.pad(x, (0, (div - W % div) % div, 0, (div - H % div) % div))
        images = ImageList(x, [(int(H), int(W))])
        features = model.backbone(images.tensor)
        features = [features[f] for f in model.head_in_features]
        predictions = model.head(features)
        result = model.forward_inference(images, features, predictions)[0]
        boxes = result.pred_boxes.tensor
        keep = ((boxes[:, 2] - boxes[:, 0]) > 0) & (
            (boxes[:, 3] - boxes[:, 1]) > 0
        )  # Boxes.nonempty()
        return boxes[keep], result.scores[keep], result.pred_classes[keep]


# ----------------------------------------------------------------------------- export
@contextlib.contextmanager
def _quiet_tracer():
    """The tracer warns wherever a shape becomes a constant (anchors, padding, top-k sizes,
    Python branches of Detectron2's structures): expected, since the graph is specialized to
    the traced input size; NMS is scripted (no frozen branch) so its output stays dynamic."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated.*")
        yield


def export_torchscript(model: nn.Module, image: Tensor, path: str) -> str:
    """Trace :class:`ExportableDetector` on ``image`` (1, 3, H, W) and save it to ``path``."""
    wrapper = ExportableDetector(model)
    with torch.no_grad(), _quiet_tracer():
        traced = torch.jit.trace(wrapper, (image,), check_trace=False)
    torch.jit.save(traced, path)
    return path


def export_onnx(model: nn.Module, image: Tensor, path: str, opset: int = 17) -> str:
    """Export :class:`ExportableDetector` traced on ``image`` to ONNX (TorchScript-based
    exporter: torchvision registers NMS -> NonMaxSuppression for it)."""
    wrapper = ExportableDetector(model)
    with torch.no_grad(), _quiet_tracer():
        torch.onnx.export(
            wrapper,
            (image,),
            path,
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=list(OUTPUT_NAMES),
            do_constant_folding=True,
        )
    return path


def load_runner(path: str):
    """A callable ``(1, 3, H, W) tensor -> (boxes, scores, classes)`` for an exported file
    (``.ts``/``.pt``: TorchScript; ``.onnx``: onnxruntime on CPU)."""
    if path.endswith(".onnx"):
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run_onnx(image: Tensor):
            outs = session.run(list(OUTPUT_NAMES), {name: image.detach().cpu().numpy()})
            return tuple(torch.from_numpy(o) for o in outs)

        return run_onnx
    module = torch.jit.load(path, map_location="cpu")

    def run_ts(image: Tensor):
        with torch.no_grad():
            return tuple(t.cpu() for t in module(image))

    return run_ts


def pytorch_detections(model: nn.Module, image: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The model's standard inference (``model([{"image": ...}])``) on a (1, 3, H, W) image."""
    with torch.no_grad():
        inst = model([{"image": image[0]}])[0]["instances"].to("cpu")
    return inst.pred_boxes.tensor, inst.scores, inst.pred_classes


def compare_detections(
    expected: Sequence[Tensor],
    actual: Sequence[Tensor],
    box_atol: float = 0.05,
    score_atol: float = 1e-4,
) -> Optional[str]:
    """None if two (boxes, scores, classes) results agree, else a description of the first
    difference. Both must have the same detections in the same (score) order; boxes within
    ``box_atol`` pixels, scores within ``score_atol``, classes equal."""
    (eb, es, ec), (ab, as_, ac) = expected, actual
    if len(eb) != len(ab):
        return f"{len(eb)} detections expected, {len(ab)} exported"
    if len(eb) == 0:
        return None
    if not torch.equal(ec.long(), ac.long()):
        return f"classes differ at {int((ec.long() != ac.long()).nonzero()[0])}"
    score_err = (es.float() - as_.float()).abs().max().item()
    box_err = (eb.float() - ab.float()).abs().max().item()
    if score_err > score_atol:
        return f"scores differ by {score_err:.2e} (tolerance {score_atol})"
    if box_err > box_atol:
        return f"boxes differ by {box_err:.3f} px (tolerance {box_atol})"
    return None


# ----------------------------------------------------------------------------- CLI
def load_image(path: str, cfg) -> Tensor:
    """An image file as the test-time input: ``INPUT.FORMAT``, resized as the Predictor does
    (``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)`` sizes, ``INPUT.RESIZE_BACKEND`` pixels)
    -> (1, 3, H, W) float."""
    from detectron2.data.detection_utils import read_image

    from .data.mapper import SafeResizeShortestEdge
    from .data.transforms import resize_backend

    img = read_image(path, format=cfg.INPUT.FORMAT)
    aug = SafeResizeShortestEdge(
        [cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST, backend=resize_backend(cfg)
    )
    img = aug.get_transform(img).apply_image(img)
    return torch.as_tensor(img.astype("float32").transpose(2, 0, 1))[None]


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_file_argument(p)
    p.add_argument("--format", choices=("torchscript", "onnx"), required=True)
    p.add_argument("--output", required=True, help="output directory (created if needed)")
    p.add_argument(
        "--sample-image", default="", help="image to trace with (resized as at test time)"
    )
    p.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        default=(800, 1333),
        metavar=("H", "W"),
        help="random sample size without --sample-image",
    )
    p.add_argument(
        "--check-images",
        nargs="*",
        default=[],
        help="more images of the sample's size to check the export on",
    )
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--box-atol", type=float, default=0.05, help="pixels (default 0.05)")
    p.add_argument("--score-atol", type=float, default=1e-4)
    add_register_coco_argument(p)
    add_opts_argument(p)
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[export] %(message)s")
    from detectron2.modeling import build_model

    from .engine import build_cfg
    from .engine.checkpoint import load_weights

    cfg = build_cfg(args.config_file, args.opts, args.register_coco, freeze=False)
    cfg.MODEL.DEVICE = "cpu"  # exported on CPU; the graph itself is device-agnostic for TorchScript
    cfg.freeze()
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        load_weights(model, cfg)  # missing/unreadable file, other architecture or classes: named
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting a randomly initialized model")

    # The exported graph is the optimized model (BatchNorms folded; the memory format is a
    # runtime matter, ONNX has none); the checks below compare it with the model as loaded.
    reference = model
    model = optimize_for_inference(copy.deepcopy(model), cfg, memory_format="contiguous")

    if args.sample_image:
        image = load_image(args.sample_image, cfg)
    else:
        torch.manual_seed(0)
        image = torch.rand(1, 3, *args.input_size) * 255
    os.makedirs(args.output, exist_ok=True)
    ext = "onnx" if args.format == "onnx" else "ts"
    path = os.path.join(args.output, f"model.{ext}")
    (
        export_onnx(model, image, path, args.opset)
        if args.format == "onnx"
        else export_torchscript(model, image, path)
    )
    logger.info(
        "wrote %s (input: 1x3x%dx%d raw %s image)",
        path,
        image.shape[2],
        image.shape[3],
        cfg.INPUT.FORMAT,
    )

    runner = load_runner(path)
    checks = [("sample", image)] + [(p, load_image(p, cfg)) for p in args.check_images]
    failures = 0
    for name, img in checks:
        if img.shape != image.shape:
            logger.error(
                "%s: size %s differs from the exported %s; skipped",
                name,
                tuple(img.shape[2:]),
                tuple(image.shape[2:]),
            )
            failures += 1
            continue
        expected, actual = pytorch_detections(reference, img), runner(img)
        problem = compare_detections(expected, actual, args.box_atol, args.score_atol)
        status = "OK" if problem is None else f"MISMATCH: {problem}"
        logger.info("%s: %d detections, exported vs PyTorch: %s", name, len(expected[0]), status)
        if len(expected[0]) == 0:
            logger.warning(
                "%s: no detections to compare (random weights?): the check only covers the empty "
                "output",
                name,
            )
        failures += problem is not None
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
