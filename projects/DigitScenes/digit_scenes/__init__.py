"""DigitScenes: a small, real, multi-class detection dataset that needs no download.

Scenes of handwritten digits (scikit-learn's bundled ``load_digits``) with exact boxes,
generated deterministically at first use and cached under
``$DETECTRON2_DATASETS/digit_scenes`` (default ``./datasets/digit_scenes``), then
registered in Detectron2's catalogs as two COCO-format datasets:

* ``digit_scenes_train`` (2000 images), ``digit_scenes_val`` (200 images), classes "0".."9".
* ``digit_scenes_crowded_train`` / ``_val``: the same sizes, 6-14 digits per scene, 12-64 px,
  boxes overlapping (:data:`CROWDED_PARAMS`), cached next to it (``.../digit_scenes_crowded``).

Usage::

    from gfocalv2 import compat
    compat.apply()                   # first, in every entry point (gfocalv2/compat.py)
    from digit_scenes import register_digit_scenes
    register_digit_scenes()          # generates on first use, then only registers
    # cfg.DATASETS.TRAIN = ("digit_scenes_train",); cfg.DATASETS.TEST = ("digit_scenes_val",)

To use your own COCO-format data instead, you do not need this package at all: see
``projects/DigitScenes/README.md`` (``--register-coco NAME JSON IMAGE_DIR``).
"""

import json
import logging
import os
import shutil
import tempfile
import time

from .generate import (
    CLASS_NAMES,
    CROWDED_PARAMS,
    DEFAULT_PARAMS,
    GENERATOR_VERSION,
    generate_dataset,
    params_stamp,
)

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_PARAMS",
    "GENERATOR_VERSION",
    "default_root",
    "prepare",
    "register_digit_scenes",
    "register_variants",
    "variant_of",
    "VARIANTS",
]

logger = logging.getLogger(__name__)


def default_root():
    """``$DETECTRON2_DATASETS/digit_scenes``, Detectron2's convention (default ``./datasets``)."""
    return os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "digit_scenes")


def _read_stamp(root):
    try:
        with open(os.path.join(root, "STAMP.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_complete(root, params):
    for split, key in (("train", "num_train"), ("val", "num_val")):
        if not os.path.isfile(os.path.join(root, f"{split}.json")):
            return False
        img_dir = os.path.join(root, split)
        if not os.path.isdir(img_dir) or len(os.listdir(img_dir)) != params[key]:
            return False
    return True


def prepare(root=None, params=None, force=False):
    """Generate the dataset under ``root`` unless an up-to-date copy is there; return ``root``.

    The cache is up to date when ``root/STAMP.json`` matches the generator version, every
    parameter (seed included) and the hash of scikit-learn's digits, and all files exist.
    Generation writes to a temporary sibling directory which is then renamed, so an
    interrupted run never leaves a half-written cache behind.
    """
    root = os.path.abspath(root or default_root())
    params = {**DEFAULT_PARAMS, **(params or {})}
    stamp = params_stamp(params)
    if not force and _read_stamp(root) == stamp and _is_complete(root, params):
        logger.info("DigitScenes: using the cached dataset in %s", root)
        return root
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    logger.info(
        "DigitScenes: generating %d train + %d val scenes (seed %d) into %s ...",
        params["num_train"],
        params["num_val"],
        params["seed"],
        root,
    )
    tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".tmp-", dir=parent)
    start = time.perf_counter()
    try:
        generate_dataset(tmp, params)
        if os.path.exists(root):
            shutil.rmtree(root)
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("DigitScenes: generated in %.1f s", time.perf_counter() - start)
    return root


def register_digit_scenes(root=None, params=None, prefix="digit_scenes"):
    """Generate (if needed) and register ``<prefix>_train`` and ``<prefix>_val``.

    Returns the two dataset names. Registering again (same process) is a no-op.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    root = prepare(root, params)
    names = []
    for split in ("train", "val"):
        name = f"{prefix}_{split}"
        names.append(name)
        json_file = os.path.join(root, f"{split}.json")
        image_root = os.path.join(root, split)
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if getattr(meta, "json_file", None) == json_file:
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        # thing_classes set here too, so that demos and visualisers have them before loading.
        register_coco_instances(name, {"thing_classes": list(CLASS_NAMES)}, json_file, image_root)
    return names


#: The variants by dataset-name prefix: their parameters on top of DEFAULT_PARAMS.
VARIANTS = {"digit_scenes": {}, "digit_scenes_crowded": CROWDED_PARAMS}


def variant_of(dataset_name):
    """The variant (a key of :data:`VARIANTS`) that ``dataset_name`` belongs to, or None."""
    for prefix in sorted(VARIANTS, key=len, reverse=True):  # digit_scenes_crowded first
        if dataset_name in (f"{prefix}_train", f"{prefix}_val"):
            return prefix
    return None


def register_variants(dataset_names, data_root=None):
    """Generate (if needed) and register every DigitScenes variant that ``dataset_names`` use.

    ``data_root`` is the folder of the plain variant (default :func:`default_root`); the others
    live next to it, named after their prefix (``datasets/digit_scenes_crowded``).
    """
    base = os.path.abspath(data_root or default_root())
    for prefix in sorted({variant_of(n) for n in dataset_names} - {None}):
        root = base if prefix == "digit_scenes" else os.path.join(os.path.dirname(base), prefix)
        register_digit_scenes(root, VARIANTS[prefix], prefix=prefix)
