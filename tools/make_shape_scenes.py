#!/usr/bin/env python
"""ShapeScenes: a COCO-format detection set of mirror-symmetric shapes, for measuring
test-time augmentation (tools/benchmark_tta.py) on objects that a horizontal flip keeps in
their class (DigitScenes' digits are not: a mirrored "2" is no digit).

    python tools/make_shape_scenes.py OUT_DIR [--train 1500] [--val 300] [--seed 0]

Writes ``OUT_DIR/{train,val}.json`` and ``OUT_DIR/{train,val}/*.png``. Each scene is an RGB
image of random size (width and height 192-320 pixels) with a noisy colour-gradient
background and 1-8 shapes of 4 classes: rectangle, ellipse, triangle (apex up) and plus sign,
all symmetric about a vertical axis, each with a random colour and a height of 10-100 pixels
(log-uniform, so that small, medium and large objects all occur), a random aspect ratio
(0.6-1.6), and overlapping at most a quarter of an earlier shape's box. Boxes are the shapes'
pixel extents. Deterministic for a seed; train and val use different streams.
"""

import argparse
import json
import os

import cv2
import numpy as np

CLASSES = ["rectangle", "ellipse", "triangle", "plus"]


def _background(rng, h, w):
    base = rng.uniform(0.3, 0.9, size=3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    grad = rng.uniform(-0.25, 0.25, size=(2, 3))
    img = base + (yy[..., None] / h) * grad[0] + (xx[..., None] / w) * grad[1]
    img = img + rng.normal(0.0, rng.uniform(0.02, 0.08), size=(h, w, 3))
    return np.clip(img, 0, 1)


def _mask(kind, bh, bw):
    """(bh, bw) bool mask of a shape filling its box, symmetric about the vertical axis."""
    mask = np.zeros((bh, bw), np.uint8)
    if kind == 0:
        mask[:] = 1
    elif kind == 1:
        cv2.ellipse(mask, (((bw - 1) / 2, (bh - 1) / 2), (bw, bh), 0), 1, -1)
    elif kind == 2:
        apex = (bw - 1) / 2
        pts = np.array([[apex, 0], [0, bh - 1], [bw - 1, bh - 1]], np.float32)
        cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 1, shift=4)
    else:
        t_h, t_w = max(1, bh // 3), max(1, bw // 3)
        mask[(bh - t_h) // 2 : (bh - t_h) // 2 + t_h, :] = 1
        mask[:, (bw - t_w) // 2 : (bw - t_w) // 2 + t_w] = 1
    return mask.astype(bool)


def _scene(rng):
    h, w = (int(v) for v in rng.integers(192, 321, size=2))
    img = _background(rng, h, w)
    boxes, classes = [], []
    for _ in range(int(rng.integers(1, 9))):
        for _attempt in range(20):
            bh = int(round(np.exp(rng.uniform(np.log(10), np.log(100)))))
            bw = max(6, int(round(bh * rng.uniform(0.6, 1.6))))
            if bh >= h or bw >= w:
                continue
            y, x = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
            box = np.array([x, y, x + bw, y + bh], np.float32)
            if all(_overlap(box, b) <= 0.25 for b in boxes):
                break
        else:
            continue
        kind = int(rng.integers(0, len(CLASSES)))
        mask = _mask(kind, bh, bw)
        colour = rng.uniform(0, 1, size=3)
        while np.abs(colour - img[y + bh // 2, x + bw // 2]).sum() < 0.6:  # visible
            colour = rng.uniform(0, 1, size=3)
        region = img[y : y + bh, x : x + bw]
        region[mask] = colour + rng.normal(0, 0.02, size=(int(mask.sum()), 3))
        ys, xs = np.nonzero(mask)
        boxes.append(np.array([x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1]))
        classes.append(kind)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), boxes, classes


def _overlap(a, b):
    """Intersection over the area of ``b`` (an earlier shape's box)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return iw * ih / max(1.0, (b[2] - b[0]) * (b[3] - b[1]))


def write_split(out_dir, split, num, seed):
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    image_dir = os.path.join(out_dir, split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(num):
        img, boxes, classes = _scene(rng)
        file_name = f"{i:06d}.png"
        if not cv2.imwrite(os.path.join(image_dir, file_name), img[:, :, ::-1]):
            raise OSError(f"could not write {os.path.join(image_dir, file_name)}")
        images.append({"id": i + 1, "file_name": file_name, "height": img.shape[0],
                       "width": img.shape[1]})  # fmt: skip
        for box, c in zip(boxes, classes):
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": c + 1,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                "iscrowd": 0})  # fmt: skip
    data = {
        "info": {"description": f"ShapeScenes {split} (tools/make_shape_scenes.py, seed {seed})"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)],
    }
    path = os.path.join(out_dir, f"{split}.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path, len(annotations)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--train", type=int, default=1500)
    p.add_argument("--val", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for split, num in (("train", args.train), ("val", args.val)):
        path, boxes = write_split(args.out_dir, split, num, args.seed)
        print(f"{path}: {num} images, {boxes} boxes")


if __name__ == "__main__":
    main()
