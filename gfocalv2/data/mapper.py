"""A DatasetMapper whose failures name the image, a resize that never produces an empty
image and resizes with the config's ``INPUT.RESIZE_BACKEND`` (OpenCV bilinear as the
reference, or Detectron2's PIL bilinear; see :mod:`.transforms`), and input normalization for
extreme inputs (gray, RGBA, 1x1, extreme aspect ratio)."""

import logging
import sys

import numpy as np
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from PIL import Image

from .transforms import (
    DEFAULT_RESIZE_BACKEND,
    check_resize_backend,
    resize_backend,
    resize_transform,
)

__all__ = [
    "ImageLoadError",
    "RobustDatasetMapper",
    "SafeResizeShortestEdge",
    "safe_augmentations",
    "to_three_channels",
]

logger = logging.getLogger(__name__)


class ImageLoadError(RuntimeError):
    """An image of a dataset could not be read or mapped; the message names the file."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class SafeResizeShortestEdge(T.ResizeShortestEdge):
    """Detectron2's ResizeShortestEdge, except that no side becomes 0 pixels, and that the
    pixels are resized with ``backend`` (:data:`~gfocalv2.data.transforms.RESIZE_BACKENDS`).

    With an extreme aspect ratio (e.g. 1 x 5000), capping the long side at ``max_size``
    rounds the short side to 0 and the resize fails deep in PIL/OpenCV; here it is at
    least 1 pixel. The output size is otherwise Detectron2's (``get_output_shape``), whatever
    the backend: "pil-bilinear" gives Detectron2's ``ResizeTransform``, "cv2-bilinear" a
    :class:`~gfocalv2.data.transforms.CV2ResizeTransform` (the reference's ``mmcv.imresize``).
    """

    #: for instances made by :func:`safe_augmentations` from a ResizeShortestEdge's attributes
    backend = DEFAULT_RESIZE_BACKEND

    def __init__(
        self,
        short_edge_length,
        max_size=sys.maxsize,
        sample_style="range",
        interp=Image.BILINEAR,
        backend=DEFAULT_RESIZE_BACKEND,
    ):
        super().__init__(short_edge_length, max_size, sample_style, interp)
        self.backend = check_resize_backend(backend)

    def get_transform(self, image):
        h, w = image.shape[:2]
        if self.is_range:
            size = np.random.randint(self.short_edge_length[0], self.short_edge_length[1] + 1)
        else:
            size = np.random.choice(self.short_edge_length)
        if size == 0:
            return T.NoOpTransform()
        newh, neww = self.get_output_shape(h, w, size, self.max_size)
        return resize_transform(h, w, max(1, newh), max(1, neww), self.backend, self.interp)


def safe_augmentations(augmentations, backend=DEFAULT_RESIZE_BACKEND):
    """The list with each ResizeShortestEdge replaced by a :class:`SafeResizeShortestEdge`
    resizing with ``backend``."""
    check_resize_backend(backend)
    out = []
    for aug in augmentations:
        if type(aug) is T.ResizeShortestEdge:
            safe = SafeResizeShortestEdge.__new__(SafeResizeShortestEdge)
            safe.__dict__.update(aug.__dict__)
            safe.backend = backend
            aug = safe
        out.append(aug)
    return out


def to_three_channels(image, input_name="image"):
    """An HxWx3 array from HxW (gray), HxWx1, HxWx3 or HxWx4 (alpha dropped) input.

    Raises ValueError naming the shape for anything else (empty images included).
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{input_name} must be a numpy array (H, W, C), got {type(image).__name__}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"{input_name} has shape {image.shape}; "
            "expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{input_name} is empty (shape {image.shape})")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    return image


class RobustDatasetMapper(DatasetMapper):
    """Detectron2's DatasetMapper (boxes), with

    * :class:`SafeResizeShortestEdge` instead of ResizeShortestEdge, resizing with
      ``INPUT.RESIZE_BACKEND`` (training and test);
    * every failure (missing/unreadable/truncated image, size differing from the json,
      bad annotation) re-raised as :class:`ImageLoadError` naming the file and the cause;
      the training loader (:mod:`gfocalv2.data.loader`) skips such images with a warning.
    """

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret["augmentations"] = safe_augmentations(ret["augmentations"], resize_backend(cfg))
        return ret

    def __call__(self, dataset_dict):
        file_name = dataset_dict.get("file_name", "<no file_name>")
        try:
            return super().__call__(dataset_dict)
        except Exception as e:  # noqa: BLE001  (anything PIL/OpenCV/our transforms raise)
            from detectron2.data.detection_utils import SizeMismatchError

            if isinstance(e, SizeMismatchError):
                exp = (dataset_dict.get("width"), dataset_dict.get("height"))
                hint = " Fix width/height of this image in the json"
                try:
                    from .validation import image_size_from_header

                    actual = image_size_from_header(file_name)
                    if actual == exp[::-1]:
                        hint += " (width and height look swapped: EXIF orientation?)"
                    reason = (
                        f"its size is {actual[0]}x{actual[1]} but the json says {exp[0]}x{exp[1]}."
                    )
                except Exception:  # noqa: BLE001
                    reason = str(e)
                raise ImageLoadError(f"image {file_name}: {reason}{hint}") from e
            if isinstance(e, FileNotFoundError):
                raise ImageLoadError(f"image {file_name} does not exist") from e
            raise ImageLoadError(
                f"image {file_name} cannot be used ({type(e).__name__}: {e})"
            ) from e
