"""Deterministic generation of the DigitScenes detection dataset.

Each scene is an RGB image (``image_size`` x ``image_size``) with a light, noisy, coloured
background and a few handwritten digits taken from scikit-learn's bundled ``load_digits``
(1797 grey 8x8 images, 10 classes). Each digit is upscaled to a random height
(``min_size``..``max_size`` pixels, log-uniform), slightly stretched, given a random dark
colour and alpha-blended into the scene. Its box is the exact bounding box of its visible
ink (pixel-edge convention: COCO ``[x, y, w, h]`` with ``x`` the first inked column and
``w`` the number of columns spanned), so the boxes are tight by construction.

The train and val splits draw their digits from disjoint halves of ``load_digits`` (a
seeded 80/20 split of the 1797 samples), so val measures generalisation to unseen
handwriting. Everything depends only on ``seed`` and the parameters: the same call writes
byte-identical PNGs and json.
"""

import hashlib
import json
import os

import numpy as np

__all__ = [
    "CROWDED_PARAMS",
    "DEFAULT_PARAMS",
    "GENERATOR_VERSION",
    "CLASS_NAMES",
    "generate_split",
    "generate_dataset",
]

#: Bump when the drawing code changes, so that cached datasets are regenerated.
GENERATOR_VERSION = 1
CLASS_NAMES = [str(i) for i in range(10)]
#: COCO category ids are 1..10 for digits "0".."9" (Detectron2 maps them to 0..9).
CATEGORY_IDS = list(range(1, 11))

DEFAULT_PARAMS = {
    "seed": 0,
    "num_train": 2000,
    "num_val": 200,
    "image_size": 160,
    "min_size": 16,  # digit height range in pixels (the ink box height)
    "max_size": 56,
    "min_digits": 1,  # min_digits..max_digits digits per scene (fewer when they do not fit)
    "max_digits": 5,
    # None: digits kept 2 px apart, so that no two boxes overlap. A number: boxes may overlap up
    # to this IoU, provided that the inks barely touch (max_ink_overlap below): crowded scenes
    # whose boxes still each show one whole digit.
    "max_box_iou": None,
    # With max_box_iou: the most of a digit's ink (fraction of its pixels) that a digit drawn
    # later may cover, and the most of the new digit's ink that may fall on earlier ink.
    "max_ink_overlap": 0.05,
}

#: The crowded variant (``digit_scenes_crowded``): 6-14 digits per scene at more varied scales,
#: boxes overlapping up to IoU 0.5, inks by up to 15 % (the DGQP study, docs/analysis.md).
CROWDED_PARAMS = {
    "min_digits": 6,
    "max_digits": 14,
    "min_size": 12,
    "max_size": 64,
    "max_box_iou": 0.5,
    "max_ink_overlap": 0.15,
}

_INK_THRESHOLD = 0.25  # of the digit's max intensity; below it the digit is fully transparent


def _load_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    return images, d.target.astype(np.int64)


def _split_indices(num, seed):
    """The seeded 80/20 split of the digit samples: (train_indices, val_indices)."""
    perm = np.random.default_rng([seed, 12345]).permutation(num)
    n_train = int(round(num * 0.8))
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


def _render_digit(glyph, height, width):
    """Upscale an 8x8 glyph in [0,1] to (height, width) and return its alpha in [0,1]."""
    import cv2

    big = cv2.resize(glyph, (width, height), interpolation=cv2.INTER_CUBIC)
    big = np.clip(big, 0.0, 1.0)
    peak = float(big.max())
    if peak <= 0:
        return np.zeros_like(big)
    t = _INK_THRESHOLD * peak
    alpha = np.clip((big - t) / (peak - t), 0.0, 1.0)
    # Sharpen the ramp a little so that strokes look like ink, not blur.
    return np.clip(alpha * 1.6, 0.0, 1.0).astype(np.float32)


def _background(rng, size):
    base = rng.uniform(0.70, 1.0, size=3).astype(np.float32)
    # A smooth colour gradient plus pixel noise and a few faint blobs (clutter without ink).
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    grad_dir = rng.uniform(-0.12, 0.12, size=(2, 3)).astype(np.float32)
    img = base[None, None, :] + yy[..., None] * grad_dir[0] + xx[..., None] * grad_dir[1]
    img = img + rng.normal(0.0, rng.uniform(0.01, 0.05), size=(size, size, 3)).astype(np.float32)
    for _ in range(int(rng.integers(0, 4))):
        cy, cx = rng.uniform(0, size, size=2)
        r = rng.uniform(size * 0.05, size * 0.25)
        blob = np.exp(-((yy * size - cy) ** 2 + (xx * size - cx) ** 2) / (2 * r * r))
        img = img + blob[..., None] * rng.uniform(-0.15, 0.15, size=3).astype(np.float32)
    return img


def _fits(box, alpha, boxes, ink, ink_areas, top, left, params):
    """Whether a digit (XYXY ``box``, ``alpha`` (h, w) placed at ``top``, ``left``) may join the
    scene's ``boxes`` (their ink map ``ink`` and ink pixel counts ``ink_areas``)."""
    b = np.asarray(boxes)
    if params["max_box_iou"] is None:
        # Keep digits apart (2 px gap) so that every box shows one whole digit.
        near = (
            (box[0] < b[:, 2] + 2)
            & (b[:, 0] < box[2] + 2)
            & (box[1] < b[:, 3] + 2)
            & (b[:, 1] < box[3] + 2)
        )
        return not near.any()
    inter_w = np.clip(np.minimum(box[2], b[:, 2]) - np.maximum(box[0], b[:, 0]), 0, None)
    inter_h = np.clip(np.minimum(box[3], b[:, 3]) - np.maximum(box[1], b[:, 1]), 0, None)
    inter = inter_w * inter_h
    areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    iou = inter / ((box[2] - box[0]) * (box[3] - box[1]) + areas - inter)
    if (iou > params["max_box_iou"]).any():
        return False
    # Ink drawn over: each earlier digit keeps almost all of its strokes, so its box stays exact.
    h, w = alpha.shape
    under = ink[top : top + h, left : left + w][alpha > 0]
    covered = np.bincount(under, minlength=len(boxes) + 1)[1:]
    limit = params["max_ink_overlap"]
    return covered.sum() <= limit * len(under) and (covered <= limit * np.asarray(ink_areas)).all()


def _draw_scene(rng, glyphs, labels, pool, params):
    """Returns the RGB uint8 image, the XYXY boxes, the classes and an ink map (H, W) int32:
    0 for background, i + 1 where digit i has ink (alpha > 0)."""
    size = params["image_size"]
    img = _background(rng, size)
    ink = np.zeros((size, size), dtype=np.int32)
    boxes, classes, ink_areas = [], [], []
    n_digits = int(rng.integers(params["min_digits"], params["max_digits"] + 1))
    log_lo, log_hi = np.log(params["min_size"]), np.log(params["max_size"])
    for _ in range(n_digits):
        for _attempt in range(20):
            k = int(pool[rng.integers(0, len(pool))])
            h = int(round(np.exp(rng.uniform(log_lo, log_hi))))
            w = max(4, int(round(h * rng.uniform(0.8, 1.2))))
            alpha = _render_digit(glyphs[k], h, w)
            ys, xs = np.nonzero(alpha > 0)
            if len(ys) == 0:
                continue
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            alpha = alpha[y0:y1, x0:x1]
            bh, bw = alpha.shape
            if bh > size or bw > size:
                continue
            top = int(rng.integers(0, size - bh + 1))
            left = int(rng.integers(0, size - bw + 1))
            box = np.array([left, top, left + bw, top + bh], dtype=np.float64)
            if boxes and not _fits(box, alpha, boxes, ink, ink_areas, top, left, params):
                continue
            colour = rng.uniform(0.0, 0.45, size=3).astype(np.float32)
            region = img[top : top + bh, left : left + bw]
            a = alpha[..., None]
            img[top : top + bh, left : left + bw] = region * (1 - a) + colour * a
            ink[top : top + bh, left : left + bw][alpha > 0] = len(boxes) + 1
            boxes.append(box)
            classes.append(int(labels[k]))
            ink_areas.append(int((alpha > 0).sum()))
            break
    img = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return img, boxes, classes, ink


def generate_split(out_dir, split, params=None):
    """Write ``<out_dir>/<split>/*.png`` and ``<out_dir>/<split>.json``; return the json path."""
    import cv2

    params = {**DEFAULT_PARAMS, **(params or {})}
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    glyphs, labels = _load_digits()
    train_idx, val_idx = _split_indices(len(glyphs), params["seed"])
    pool = train_idx if split == "train" else val_idx
    num = params["num_train" if split == "train" else "num_val"]
    rng = np.random.default_rng([params["seed"], 0 if split == "train" else 1])

    img_dir = os.path.join(out_dir, split)
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(num):
        img, boxes, classes, _ = _draw_scene(rng, glyphs, labels, pool, params)
        file_name = f"{i:06d}.png"
        # cv2 writes BGR; the PNG holds the RGB scene.
        if not cv2.imwrite(os.path.join(img_dir, file_name), img[:, :, ::-1]):
            raise OSError(f"could not write {os.path.join(img_dir, file_name)}")
        image_id = i + 1
        images.append(
            {"id": image_id, "file_name": file_name, "height": img.shape[0], "width": img.shape[1]}
        )
        for box, c in zip(boxes, classes):
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[c],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {
            "description": f"DigitScenes {split} (generated from sklearn load_digits)",
            "version": str(GENERATOR_VERSION),
            "params": params,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": cid, "name": name, "supercategory": "digit"}
            for cid, name in zip(CATEGORY_IDS, CLASS_NAMES)
        ],
    }
    json_path = os.path.join(out_dir, f"{split}.json")
    with open(json_path, "w") as f:
        json.dump(coco, f)
    return json_path


def params_stamp(params):
    """The cache stamp: generator version + every parameter (seed included) + sklearn data hash."""
    params = {**DEFAULT_PARAMS, **(params or {})}
    glyphs, labels = _load_digits()
    digest = hashlib.sha1(glyphs.tobytes() + labels.tobytes()).hexdigest()[:16]
    return {"generator_version": GENERATOR_VERSION, "params": params, "digits_sha1": digest}


def generate_dataset(out_dir, params=None):
    """Generate both splits into ``out_dir`` (no caching here; see :func:`digit_scenes.prepare`)."""
    os.makedirs(out_dir, exist_ok=True)
    for split in ("train", "val"):
        generate_split(out_dir, split, params)
    with open(os.path.join(out_dir, "STAMP.json"), "w") as f:
        json.dump(params_stamp(params), f, indent=1, sort_keys=True)
    return out_dir
