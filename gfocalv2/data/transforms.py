"""The resize of the authors' code: OpenCV bilinear (``mmcv.imresize``), at Detectron2's sizes.

Detectron2's ``ResizeTransform`` resizes uint8 images with PIL, whose bilinear filter
antialiases when shrinking (its support grows with the scale factor); the reference resizes
with ``cv2.resize(..., interpolation=cv2.INTER_LINEAR)``, which always interpolates between
the 2x2 nearest source pixels. ``INPUT.RESIZE_BACKEND`` picks one of :data:`RESIZE_BACKENDS`:

* ``"cv2-bilinear"``: :class:`CV2ResizeTransform` (the published configs);
* ``"pil-bilinear"``: Detectron2's ``ResizeTransform`` (the default of ``add_gfocalv2_config``).

Only the pixels differ: the output sizes (Detectron2's ``ResizeShortestEdge``) and the box
coordinates (scaled by new/old size per axis) are the same for both.
"""

import cv2
import numpy as np
from detectron2.data import transforms as T
from PIL import Image

__all__ = [
    "RESIZE_BACKENDS",
    "RESIZE_BACKEND_KEY",
    "DEFAULT_RESIZE_BACKEND",
    "CV2ResizeTransform",
    "check_resize_backend",
    "resize_backend",
    "resize_transform",
]

#: The values of ``INPUT.RESIZE_BACKEND``.
RESIZE_BACKENDS = ("cv2-bilinear", "pil-bilinear")
RESIZE_BACKEND_KEY = "INPUT.RESIZE_BACKEND"
#: Detectron2's resize: the behaviour of configs that do not set the key.
DEFAULT_RESIZE_BACKEND = "pil-bilinear"


class CV2ResizeTransform(T.ResizeTransform):
    """Detectron2's ``ResizeTransform`` whose images are resized by ``cv2.resize`` with
    ``INTER_LINEAR`` (the reference's ``mmcv.imresize``), for uint8 and float images alike.

    Boxes and coordinates are scaled exactly as ``ResizeTransform`` does (inherited).
    Segmentation maps keep ``ResizeTransform``'s nearest-neighbour resize, and so does an
    explicit non-bilinear ``interp`` argument.

    Input: (H, W), (H, W, C) with C <= 512 channels; output (new_h, new_w[, C]), same dtype.
    """

    def apply_image(self, img, interp=None):
        interp_method = interp if interp is not None else self.interp
        if interp_method != Image.BILINEAR:  # e.g. apply_segmentation's NEAREST
            return super().apply_image(img, interp=interp_method)
        assert img.shape[:2] == (self.h, self.w), (img.shape, (self.h, self.w))
        if img.ndim not in (2, 3):
            raise ValueError(
                f"CV2ResizeTransform resizes (H, W) or (H, W, C) images, got shape {img.shape}"
            )
        out = cv2.resize(
            np.ascontiguousarray(img), (self.new_w, self.new_h), interpolation=cv2.INTER_LINEAR
        )
        if img.ndim == 3 and out.ndim == 2:  # cv2 drops a single channel axis
            out = out[:, :, None]
        return out

    def inverse(self):
        return CV2ResizeTransform(self.new_h, self.new_w, self.h, self.w, self.interp)


def check_resize_backend(value, source=RESIZE_BACKEND_KEY):
    """``value`` if it is one of :data:`RESIZE_BACKENDS`, else a ValueError naming ``source``
    (the key, or where its value came from) and the allowed values."""
    if value not in RESIZE_BACKENDS:
        allowed = ", ".join(repr(b) for b in RESIZE_BACKENDS)
        raise ValueError(
            f"{source}: {RESIZE_BACKEND_KEY} {value!r} is not one of {allowed} "
            "('cv2-bilinear': OpenCV bilinear as the reference's mmcv.imresize; "
            "'pil-bilinear': Detectron2's PIL resize)"
        )
    return value


def resize_backend(cfg):
    """The checked ``INPUT.RESIZE_BACKEND`` of ``cfg`` (Detectron2's "pil-bilinear" when the
    config lacks the key)."""
    return check_resize_backend(cfg.INPUT.RESIZE_BACKEND)


def resize_transform(h, w, new_h, new_w, backend=DEFAULT_RESIZE_BACKEND, interp=None):
    """A resize from (h, w) to (new_h, new_w) with the given backend (:data:`RESIZE_BACKENDS`)."""
    cls = (
        CV2ResizeTransform if check_resize_backend(backend) == "cv2-bilinear" else T.ResizeTransform
    )
    return cls(h, w, new_h, new_w, interp)
