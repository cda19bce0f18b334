#!/usr/bin/env python
"""Write a seeded synthetic detection set the size of COCO train2017 (118,287 images, about
860k annotations with polygon segmentations like COCO's, 80 categories with COCO's ids) as
one COCO json plus one small image file per image, for the data-loader benchmark
(``tools/benchmark_data_loader.py``).

What matches COCO: the number of images and annotations, the json's fields (images with
license/coco_url/date_captured/flickr_url; annotations with segmentation/area/iscrowd/bbox/
category_id/id), polygons of about 24 points on average (one to three per object), 0.9 % crowd
annotations with uncompressed RLE masks, about 1 % images without annotations, a skewed class
distribution, landscape and portrait images. What does not: the images are tiny (their longest
side is ``--long-side`` pixels, 64 by default, and all images of one size are the same
encoded JPEG), so that reading them costs little and the benchmark measures the loader's own
work; the json's coordinates are in those tiny images' pixels.

    python tools/make_coco_sized_dataset.py /tmp/coco_sized          # COCO-train-sized
    python tools/make_coco_sized_dataset.py /tmp/small --images 2000 --annotations 14500

Writes ``OUT/train.json`` and ``OUT/images/000000000001.jpg``, ...; prints the counts and
sizes. The same arguments and seed give the same files.
"""

import argparse
import io
import json
import os
import sys
import time

import numpy as np

#: COCO's 80 category ids (1..90 with gaps).
COCO_IDS = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
    28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53,
    54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80,
    81, 82, 84, 85, 86, 87, 88, 89, 90,
]  # fmt: skip

#: COCO-like (width, height) aspect ratios of 640-pixel images, and how often each occurs.
ASPECTS = [
    ((640, 480), 0.50),
    ((480, 640), 0.15),
    ((640, 427), 0.18),
    ((427, 640), 0.07),
    ((640, 360), 0.05),
    ((640, 640), 0.03),
    ((500, 375), 0.02),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output folder (created)")
    parser.add_argument("--images", type=int, default=118287, help="images (COCO train2017)")
    parser.add_argument(
        "--annotations", type=int, default=860001, help="annotations (COCO train2017: 860,001)"
    )
    parser.add_argument("--long-side", type=int, default=64, help="longest image side, pixels")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _sizes(rng, n, long_side):
    probs = np.array([p for _, p in ASPECTS])
    choice = rng.choice(len(ASPECTS), size=n, p=probs / probs.sum())
    table = [
        (max(8, round(w * long_side / max(w, h))), max(8, round(h * long_side / max(w, h))))
        for (w, h), _ in ASPECTS
    ]
    return [table[c] for c in choice], sorted(set(table))


def _counts(rng, n, total):
    """Annotations per image: about 1 % images without any, the rest 1 + a negative binomial
    (COCO's long tail), adjusted to sum to ``total`` exactly."""
    mean = max(total / max(n, 1) - 1.0, 0.1)
    counts = 1 + rng.negative_binomial(1.5, 1.5 / (1.5 + mean), size=n)
    counts[rng.random(n) < 0.0086] = 0
    diff = total - int(counts.sum())
    nonzero = np.flatnonzero(counts)
    while diff != 0:
        if diff > 0:
            np.add.at(counts, rng.choice(nonzero, size=diff), 1)
        else:
            pick = rng.choice(nonzero, size=min(-diff, len(nonzero)), replace=False)
            pick = pick[counts[pick] > 1]
            counts[pick] -= 1
        diff = total - int(counts.sum())
    return counts


def _jpeg(size):
    from PIL import Image

    w, h = size
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (110, 120, 130)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _annotation(rng, ann_id, image_id, w, h, cat, crowd):
    bw = float(np.exp(rng.uniform(np.log(2.0), np.log(w))))
    bh = float(np.exp(rng.uniform(np.log(2.0), np.log(h))))
    bw, bh = min(bw, w - 0.01), min(bh, h - 0.01)
    x, y = float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh))
    bbox = [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)]
    if crowd:
        # uncompressed RLE over the image (column-major runs), like COCO's crowd annotations
        start = int(x) * h + int(y)
        run = max(1, int(bw) * int(bh))
        run = min(run, w * h - start)
        segmentation = {"counts": [start, run, w * h - start - run], "size": [h, w]}
        area = float(run)
    else:
        segmentation = []
        for _ in range(1 if rng.random() < 0.9 else int(rng.integers(2, 4))):
            k = int(np.clip(np.round(rng.lognormal(np.log(20.0), 0.6)), 3, 200))
            t = np.sort(rng.uniform(0, 2 * np.pi, k))
            r = rng.uniform(0.6, 1.0, k)
            px = x + bw / 2 + (bw / 2) * r * np.cos(t)
            py = y + bh / 2 + (bh / 2) * r * np.sin(t)
            segmentation.append(np.round(np.stack([px, py], 1).reshape(-1), 2).tolist())
        area = round(bw * bh * 0.7, 2)
    return {
        "segmentation": segmentation,
        "area": area,
        "iscrowd": int(crowd),
        "image_id": image_id,
        "bbox": bbox,
        "category_id": cat,
        "id": ann_id,
    }


def make_dataset(out, images=118287, annotations=860001, long_side=64, seed=0, log=print):
    """Write ``out/train.json`` and ``out/images/``; returns (json_path, image_dir, stats)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(out, "images")
    os.makedirs(image_dir, exist_ok=True)
    sizes, distinct = _sizes(rng, images, long_side)
    encoded = {s: _jpeg(s) for s in distinct}
    counts = _counts(rng, images, annotations)
    freq = 1.0 / np.arange(1, len(COCO_IDS) + 1) ** 1.1  # skewed like COCO (person first)
    cats = rng.choice(COCO_IDS, size=int(counts.sum()), p=freq / freq.sum())
    crowd = rng.random(int(counts.sum())) < 0.009
    json_path = os.path.join(out, "train.json")
    ann_id = 0
    with open(json_path, "w") as f:
        f.write('{"info": {"description": "COCO-train-sized synthetic set", "version": "1.0"}')
        f.write(', "licenses": [{"id": 1, "name": "synthetic", "url": ""}], "images": [')
        for i, (w, h) in enumerate(sizes):
            image_id = i + 1
            file_name = f"{image_id:012d}.jpg"
            with open(os.path.join(image_dir, file_name), "wb") as img:
                img.write(encoded[(w, h)])
            entry = {
                "license": 1,
                "file_name": file_name,
                "coco_url": f"http://images.cocodataset.org/train2017/{file_name}",
                "height": h,
                "width": w,
                "date_captured": "2013-11-14 11:18:45",
                "flickr_url": f"http://farm4.staticflickr.com/{image_id}.jpg",
                "id": image_id,
            }
            f.write(("" if i == 0 else ", ") + json.dumps(entry))
        f.write('], "annotations": [')
        for i, (w, h) in enumerate(sizes):
            chunk = []
            for _ in range(int(counts[i])):
                chunk.append(
                    json.dumps(
                        _annotation(
                            rng, ann_id + 1, i + 1, w, h, int(cats[ann_id]), bool(crowd[ann_id])
                        )
                    )
                )
                ann_id += 1
            if chunk:
                f.write(("" if ann_id == len(chunk) else ", ") + ", ".join(chunk))
            if log and (i + 1) % 20000 == 0:
                log(f"  {i + 1} images, {ann_id} annotations ({time.perf_counter() - t0:.0f} s)")
        f.write('], "categories": [')
        f.write(
            ", ".join(
                json.dumps({"supercategory": "thing", "id": c, "name": f"class_{c}"})
                for c in COCO_IDS
            )
        )
        f.write("]}")
    stats = {
        "images": images,
        "annotations": ann_id,
        "crowd": int(crowd.sum()),
        "images_without_annotations": int((counts == 0).sum()),
        "json_MiB": os.path.getsize(json_path) / 2**20,
        "seconds": time.perf_counter() - t0,
    }
    return json_path, image_dir, stats


def main(argv=None):
    args = parse_args(argv)
    json_path, image_dir, stats = make_dataset(
        args.out, args.images, args.annotations, args.long_side, args.seed
    )
    print(
        f"{json_path}: {stats['images']} images ({image_dir}), {stats['annotations']} annotations "
        f"({stats['crowd']} crowd), {stats['images_without_annotations']} images without "
        f"annotations, json {stats['json_MiB']:.0f} MiB, {stats['seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
