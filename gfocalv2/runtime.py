"""Run an exported GFocalV2 / GFL model with onnxruntime, NumPy and OpenCV only.

    python -m gfocalv2.runtime exported/model.onnx --input img.jpg more.jpg images/ --output out/

    from gfocalv2.runtime import OnnxPredictor
    predictor = OnnxPredictor("exported/model.onnx")
    result = predictor(image)  # (H, W, 3) uint8 in the model's input format (metadata)
    result["boxes"], result["scores"], result["classes"], result["class_names"]

``model.onnx`` is written by ``python -m gfocalv2.export --format onnx``; its metadata says
how images are prepared (input format, ``MIN_SIZE_TEST``/``MAX_SIZE_TEST``, resize
interpolation), the score threshold and the class names. The predictor resizes the image as
Detectron2's ``ResizeShortestEdge`` does at test time, runs the graph, and maps the boxes
back to the original image's pixels as Detectron2's ``detector_postprocess`` does (scaled,
clipped, empty boxes dropped): the detections of ``gfocalv2.engine.predictor.Predictor``.
Neither torch nor Detectron2 is imported here.
"""

import argparse
import glob
import json
import os
import sys

import numpy as np

__all__ = ["OnnxPredictor", "RuntimeInputError", "resized_shape", "main"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
#: The metadata keys ``gfocalv2.export`` writes and the predictor needs.
REQUIRED_METADATA = (
    "gfocalv2.class_names",
    "gfocalv2.input_format",
    "gfocalv2.min_size_test",
    "gfocalv2.max_size_test",
    "gfocalv2.resize_backend",
    "gfocalv2.score_threshold",
)


class RuntimeInputError(ValueError):
    """A model file or an image the predictor cannot use; the message names it."""


def resized_shape(height, width, short_edge, max_size):
    """Detectron2's ``ResizeShortestEdge.get_output_shape`` (no side below 1 pixel):
    ``(new_height, new_width)``."""
    size = float(short_edge)
    scale = size / min(height, width)
    new_h, new_w = (size, scale * width) if height < width else (scale * height, size)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


def _resize(image, new_h, new_w, backend):
    """``image`` (H, W, 3) uint8 resized as ``INPUT.RESIZE_BACKEND`` says."""
    import cv2

    if (new_h, new_w) == image.shape[:2]:
        return image
    if backend == "cv2-bilinear":
        return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    if backend == "pil-bilinear":  # Detectron2's ResizeTransform: PIL, antialiased when shrinking
        from PIL import Image

        return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    raise RuntimeInputError(f"unknown resize backend {backend!r} in the model's metadata")


class OnnxPredictor:
    """Detections of an exported model on one image at a time.

    Args:
        path: the ``model.onnx`` written by ``gfocalv2.export``.
        score_threshold: the minimum score; default the exported config's.
        num_threads: onnxruntime's intra-op threads (default: its own choice).
        providers: onnxruntime execution providers (default: CPU).

    ``predictor(image)`` takes an (H, W, 3) uint8 array in ``predictor.input_format`` channel
    order and returns a dict of NumPy arrays: ``boxes`` (D, 4) float32 XYXY in the image's
    pixels, ``scores`` (D,) float32, ``classes`` (D,) int64, by decreasing score, and
    ``class_names`` (the model's list of names).
    """

    def __init__(self, path, score_threshold=None, num_threads=None, providers=None):
        import onnxruntime as ort

        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"ONNX model {path} does not exist; write one with `python -m gfocalv2.export "
                "--format onnx --output DIR ...`"
            )
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = int(num_threads)
        try:
            self.session = ort.InferenceSession(
                path, options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as e:  # noqa: BLE001  (onnxruntime raises its own exception types)
            raise RuntimeInputError(
                f"cannot load {path} as an ONNX model ({type(e).__name__}: {e}); the file is "
                "truncated or not ONNX: export it again with `python -m gfocalv2.export`"
            ) from None
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in REQUIRED_METADATA if k not in meta]
        if missing:
            raise RuntimeInputError(
                f"{path} lacks the metadata {missing}: it was not written by "
                "`python -m gfocalv2.export --format onnx` (or by an older version); "
                "export it again"
            )
        self.path = path
        self.metadata = dict(meta)
        self.class_names = json.loads(meta["gfocalv2.class_names"])
        self.input_format = meta["gfocalv2.input_format"]
        self.min_size_test = int(meta["gfocalv2.min_size_test"])
        self.max_size_test = int(meta["gfocalv2.max_size_test"])
        self.resize_backend = meta["gfocalv2.resize_backend"]
        self.score_threshold = float(
            meta["gfocalv2.score_threshold"] if score_threshold is None else score_threshold
        )

    def _check_image(self, image):
        if not isinstance(image, np.ndarray):
            raise RuntimeInputError(
                f"the image must be a NumPy array (H, W, 3), got {type(image).__name__}"
            )
        if image.ndim != 3 or image.shape[2] != 3:
            raise RuntimeInputError(
                f"the image must be (H, W, 3) {self.input_format}, got shape {image.shape}: "
                "convert gray or RGBA images to 3 channels first (e.g. cv2.cvtColor)"
            )
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise RuntimeInputError(f"the image is empty (shape {image.shape})")
        if image.dtype != np.uint8:
            raise RuntimeInputError(f"the image must be uint8, got {image.dtype}")

    def __call__(self, image):
        self._check_image(image)
        height, width = image.shape[:2]
        new_h, new_w = resized_shape(height, width, self.min_size_test, self.max_size_test)
        resized = _resize(np.ascontiguousarray(image), new_h, new_w, self.resize_backend)
        feeds = {
            "image": resized.transpose(2, 0, 1)[None].astype(np.float32),
            "score_threshold": np.asarray(self.score_threshold, dtype=np.float32),
        }
        boxes, scores, classes = self.session.run(["boxes", "scores", "classes"], feeds)
        # detector_postprocess: to the original image's pixels, clipped, empty boxes dropped
        boxes = boxes * np.array(
            [width / new_w, height / new_h, width / new_w, height / new_h], dtype=np.float32
        )
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return {
            "boxes": boxes[keep],
            "scores": scores[keep],
            "classes": classes[keep].astype(np.int64),
            "class_names": self.class_names,
        }


# ----------------------------------------------------------------------------- CLI
def _image_files(inputs):
    files = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, f)
                for f in os.listdir(item)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not found:
                raise RuntimeInputError(f"--input {item}: the folder has no image files")
            files += found
        elif os.path.isfile(item):
            files.append(item)
        else:
            matched = sorted(glob.glob(item))
            if not matched:
                raise FileNotFoundError(f"--input {item} does not exist")
            files += matched
    return files


def _read(path, input_format):
    import cv2

    image = cv2.imread(path, cv2.IMREAD_COLOR)  # BGR; gray and RGBA files become 3 channels
    if image is None:
        raise RuntimeInputError(f"cannot read {path} as an image (corrupt or not an image)")
    return image[:, :, ::-1].copy() if input_format == "RGB" else image


def draw(image_bgr, result, min_score=0.0):
    """``image_bgr`` with the boxes, class names and scores of ``result`` drawn (OpenCV)."""
    import cv2

    out = image_bgr.copy()
    names = result["class_names"]
    for box, score, cls in zip(result["boxes"], result["scores"], result["classes"]):
        if score < min_score:
            continue
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        hue = int(cls) * 47 % 180
        color = cv2.cvtColor(np.uint8([[[hue, 200, 230]]]), cv2.COLOR_HSV2BGR)[0, 0].tolist()
        cv2.rectangle(out, (x1, y1), (x2, y2), color, 2)
        label = f"{names[cls] if cls < len(names) else cls} {score:.2f}"
        cv2.putText(out, label, (x1, max(y1 - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1)
    return out


def get_parser():
    p = argparse.ArgumentParser(
        prog="python -m gfocalv2.runtime",
        description="Detect objects with an exported model (onnxruntime; no torch, no Detectron2)",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model.onnx written by python -m gfocalv2.export")
    p.add_argument("--input", nargs="+", required=True, help="images, folders or glob patterns")
    p.add_argument("--output", help="folder for the drawn images (created if needed)")
    p.add_argument("--score-threshold", type=float, help="default: the exported config's")
    p.add_argument("--threads", type=int, help="onnxruntime threads")
    return p


def main(argv=None):
    import cv2

    args = get_parser().parse_args(argv)
    try:
        predictor = OnnxPredictor(args.model, args.score_threshold, args.threads)
        files = _image_files(args.input)
    except (RuntimeInputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output:
        os.makedirs(args.output, exist_ok=True)
    failures = 0
    for path in files:
        try:
            image = _read(path, predictor.input_format)
            result = predictor(image)
        except RuntimeInputError as e:
            print(f"{path}: skipped: {e}", file=sys.stderr)
            failures += 1
            continue
        names = [predictor.class_names[c] for c in result["classes"]]
        summary = ", ".join(f"{n} {s:.2f}" for n, s in zip(names[:5], result["scores"][:5]))
        print(
            f"{path}: {len(result['boxes'])} detections" + (f" ({summary}, ...)" if names else "")
        )
        if args.output:
            bgr = image[:, :, ::-1] if predictor.input_format == "RGB" else image
            cv2.imwrite(os.path.join(args.output, os.path.basename(path)), draw(bgr, result))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
