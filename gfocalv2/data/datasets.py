"""Registering COCO-format datasets from a config or the command line, without code.

Two equivalent ways, for any json in COCO's detection format plus a folder of images:

* config: ``DATASETS.REGISTER_COCO: [["my_train", "path/train.json", "path/images"], ...]``
  (a list of ``[NAME, JSON, IMAGE_DIR]`` triples; relative paths are relative to the
  working directory), or the same as a trailing override
  ``DATASETS.REGISTER_COCO "[['my_train', 'train.json', 'images/']]"``;
* command line (``train_net.py``, ``python -m gfocalv2.demo``, project scripts):
  ``--register-coco NAME JSON IMAGE_DIR`` (repeatable). These are appended to
  ``DATASETS.REGISTER_COCO``, so that the ``config.yaml`` written to ``OUTPUT_DIR`` records them.

Then use the names in ``DATASETS.TRAIN`` / ``DATASETS.TEST`` and set
``MODEL.GFOCAL.NUM_CLASSES`` to the number of categories in the json.
"""

import logging
import os

__all__ = [
    "register_coco_datasets",
    "check_datasets_registered",
    "get_thing_classes",
    "check_num_classes",
    "NUM_CLASSES_KEYS",
]

logger = logging.getLogger(__name__)


def _normalize_entries(entries, source):
    out = []
    for i, entry in enumerate(entries or []):
        if isinstance(entry, str):
            raise ValueError(
                f"{source}[{i}] is the string {entry!r}; "
                "each entry must be a list [NAME, JSON_FILE, IMAGE_DIR]. "
                "Did you write DATASETS.REGISTER_COCO \"['n', 'j', 'd']\" "
                "instead of \"[['n', 'j', 'd']]\"?"
            )
        if len(entry) != 3 or not all(isinstance(x, str) and x for x in entry):
            raise ValueError(
                f"{source}[{i}] = {entry!r}: expected [NAME, JSON_FILE, IMAGE_DIR] "
                "(three non-empty strings)"
            )
        out.append(tuple(entry))
    return out


def register_coco_datasets(entries, source="DATASETS.REGISTER_COCO"):
    """Register each ``(name, json_file, image_dir)`` with Detectron2's ``register_coco_instances``.

    Files are checked now (not when training starts), naming the missing path and where
    it came from. Registering the same name with the same files again is a no-op;
    reusing a name that is already registered for other data (e.g. a builtin COCO split)
    is an error. Returns the list of names.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    names = []
    for i, (name, json_file, image_dir) in enumerate(_normalize_entries(entries, source)):
        where = f"{source}[{i}] ({name!r})"
        json_file, image_dir = (
            os.path.abspath(os.path.expanduser(json_file)),
            os.path.abspath(os.path.expanduser(image_dir)),
        )
        if not os.path.isfile(json_file):
            raise FileNotFoundError(f"{where}: annotation file {json_file} does not exist")
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"{where}: image directory {image_dir} does not exist")
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if (
                getattr(meta, "json_file", None) == json_file
                and getattr(meta, "image_root", None) == image_dir
            ):
                names.append(name)
                continue
            raise ValueError(
                f"{where}: a dataset named {name!r} is already registered "
                f"(json_file={getattr(meta, 'json_file', None)}); pick another name"
            )
        register_coco_instances(name, {}, json_file, image_dir)
        logger.info(
            "Registered COCO-format dataset %r: %s, images in %s", name, json_file, image_dir
        )
        names.append(name)
    return names


def check_datasets_registered(cfg, config_file=""):
    """Raise a clear KeyError if a name in DATASETS.TRAIN/TEST is not in the DatasetCatalog."""
    from detectron2.data import DatasetCatalog

    known = set(DatasetCatalog.list())
    for key in ("TRAIN", "TEST"):
        for name in cfg.DATASETS[key]:
            if name not in known:
                src = f" (from {config_file})" if config_file else ""
                raise KeyError(
                    f"DATASETS.{key} names the dataset {name!r}{src}, which is not registered. "
                    "Register a COCO-format json + image folder with "
                    "`--register-coco NAME JSON IMAGE_DIR` or the config key "
                    "DATASETS.REGISTER_COCO [[NAME, JSON, IMAGE_DIR]], or use a builtin "
                    "Detectron2 dataset (their files go under "
                    "$DETECTRON2_DATASETS, default ./datasets). DigitScenes is registered by "
                    "projects/DigitScenes/train_digits.py."
                )


def get_thing_classes(dataset_name):
    """The class names of a registered dataset, loading its annotations if needed
    (lazy COCO json)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    meta = MetadataCatalog.get(dataset_name)
    classes = getattr(meta, "thing_classes", None)
    if classes is None and dataset_name in DatasetCatalog.list():
        DatasetCatalog.get(dataset_name)  # load_coco_json fills in thing_classes
        classes = getattr(MetadataCatalog.get(dataset_name), "thing_classes", None)
    return classes


#: Where each meta-architecture reads its number of classes (others are not checked).
NUM_CLASSES_KEYS = {
    "GFocalV2": "MODEL.GFOCAL.NUM_CLASSES",
    "RetinaNet": "MODEL.RETINANET.NUM_CLASSES",
    "D2FCOS": "MODEL.RETINANET.NUM_CLASSES",  # gfocalv2.modeling.baselines
    "GeneralizedRCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
}


def check_num_classes(cfg, dataset_name):
    """Error if the dataset has more classes than the model predicts; warn if fewer."""
    key = NUM_CLASSES_KEYS.get(cfg.MODEL.META_ARCHITECTURE)
    if key is None:
        return
    classes = get_thing_classes(dataset_name)
    if classes is None:
        return
    n = cfg
    for part in key.split("."):
        n = n[part]
    if len(classes) > n:
        raise ValueError(
            f"Dataset {dataset_name!r} has {len(classes)} classes but {key} is {n}; "
            f"set {key} {len(classes)}"
        )
    if len(classes) < n:
        logger.warning(
            "Dataset %r has %d classes but %s is %d (the extra outputs are never positive)",
            dataset_name,
            len(classes),
            key,
            n,
        )
