"""Loading registered datasets with checks done once, at start-up, with a summary.

What is checked, and what happens (``is_train`` = the dataset is used for training):

========================================  ==================================================
problem                                   behaviour
========================================  ==================================================
json is not valid JSON / not COCO         error naming the file and what is wrong
  (no "images"/"categories", bad entries)
annotation with an unknown category_id    error naming the file, the ids and the known ids
dataset with no images                    error naming the dataset and its json
image file missing                        training: dropped, warning with count + examples;
                                          all missing or evaluation: error (an evaluation
                                          on a subset would be silently wrong)
image size differs from the json          ``DATASETS.CHECK_IMAGES "size"``: as missing
  (header read at start-up)               files; otherwise the training mapper skips such
                                          an image when it reads it (warning)
box with zero/negative width or height,   dropped, warning with count + examples
  or non-finite coordinates
box partly outside the image              clipped to the image, warning with count
box entirely outside the image            dropped, warning with count + examples
image with an empty annotation list       kept (negatives only) unless
                                          ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``; no image
                                          left with a box for training: error
========================================  ==================================================

With several processes (``torch.distributed``), the image files are checked once for all of
them: each process checks a contiguous share of the records and the problems found are
all-gathered (:func:`find_image_problems`), so every process drops the same images (the
training sampler's indices must mean the same image in every process). Loading is then a
collective call. The json itself is still loaded by every process.
"""

import contextlib
import copy
import gc
import json
import logging
import math
import os
from collections import Counter

__all__ = [
    "DatasetError",
    "check_image_file",
    "diagnose_coco_json",
    "find_image_problems",
    "load_dataset_dicts",
    "validate_dataset_dicts",
    "image_size_from_header",
]

logger = logging.getLogger(__name__)

_EXAMPLES = 5

# BoxMode.XYWH_ABS / XYXY_ABS (detectron2.structures.BoxMode, an IntEnum: 1 and 0)
_XYWH_ABS, _XYXY_ABS = 1, 0


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; the message says which file and what to do."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def _json_file_of(name):
    from detectron2.data import MetadataCatalog

    return getattr(MetadataCatalog.get(name), "json_file", None)


def diagnose_coco_json(json_file):
    """A one-line description of why ``json_file`` is not a usable COCO detection json, or None.

    Checks: valid JSON; an object with lists "images", "annotations" (optional) and
    "categories"; images with id/file_name/width/height; annotations with image_id/bbox
    (4 numbers)/category_id, unique ids, category ids that exist in "categories",
    image ids that exist in "images".
    """
    try:
        with open(json_file, "rb") as f:
            data = json.load(f)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"is not valid JSON ({e})"
    if not isinstance(data, dict):
        return (
            f"is a JSON {type(data).__name__}, not a COCO object with the keys "
            "'images', 'annotations' and 'categories'"
        )
    problems = []
    for key in ("images", "categories"):
        if key not in data:
            problems.append(f"has no '{key}' list (keys found: {sorted(data)[:10]})")
        elif not isinstance(data[key], list):
            problems.append(f"'{key}' is a {type(data[key]).__name__}, not a list")
    if "annotations" in data and not isinstance(data["annotations"], list):
        problems.append(f"'annotations' is a {type(data['annotations']).__name__}, not a list")
    if problems:
        return "; ".join(problems)
    image_ids = set()
    for i, img in enumerate(data["images"]):
        missing = [
            k
            for k in ("id", "file_name", "width", "height")
            if not isinstance(img, dict) or k not in img
        ]
        if missing:
            return f"images[{i}] lacks {missing} (each image needs id, file_name, width, height)"
        image_ids.add(img["id"])
    cat_ids = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            return f"categories[{i}] = {cat!r} lacks 'id' or 'name'"
        cat_ids.add(cat["id"])
    unknown_cats, unknown_images, ann_ids = Counter(), Counter(), Counter()
    for i, ann in enumerate(data.get("annotations", [])):
        missing = [
            k
            for k in ("image_id", "bbox", "category_id")
            if not isinstance(ann, dict) or k not in ann
        ]
        if missing:
            return (
                f"annotations[{i}] lacks {missing} (each annotation needs image_id, bbox, "
                "category_id)"
            )
        bbox = ann["bbox"]
        if (
            not isinstance(bbox, (list, tuple))
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) for v in bbox)
        ):
            return (
                f"annotations[{i}] (id {ann.get('id')}) has bbox {bbox!r}; "
                "expected [x, y, width, height] (4 numbers)"
            )
        if ann.get("ignore", 0):
            return (
                f"annotations[{i}] (id {ann.get('id')}) has 'ignore': {ann['ignore']}, which "
                "Detectron2 does not support; use iscrowd: 1"
            )
        if ann["category_id"] not in cat_ids:
            unknown_cats[ann["category_id"]] += 1
        if ann["image_id"] not in image_ids:
            unknown_images[ann["image_id"]] += 1
        if "id" in ann:
            ann_ids[ann["id"]] += 1
    if unknown_cats:
        listed = ", ".join(f"{c} ({n} annotations)" for c, n in unknown_cats.most_common(_EXAMPLES))
        return (
            f"has annotations whose category_id is not in 'categories': {listed}; known ids: "
            f"{sorted(cat_ids)[:20]}. Add these categories to 'categories' or remove/fix these "
            "annotations"
        )
    dup = [i for i, n in ann_ids.items() if n > 1]
    if dup:
        return (
            f"has duplicate annotation ids (e.g. {dup[:_EXAMPLES]}); annotation ids must be unique"
        )
    if unknown_images:
        # load_coco_json only warns about these; report them only if nothing else is wrong
        return None
    return None


def _load_one(name):
    """DatasetCatalog.get(name), turning a loading failure into a DatasetError naming the json."""
    from detectron2.data import DatasetCatalog

    try:
        return DatasetCatalog.get(name)
    except KeyError as e:
        if name not in DatasetCatalog.list():
            raise DatasetError(
                f"Dataset {name!r} is not registered; register it with --register-coco NAME JSON "
                "IMAGE_DIR or DATASETS.REGISTER_COCO"
            ) from None
        cause = e
    except (ValueError, AssertionError, TypeError, OSError, AttributeError, IndexError) as e:
        cause = e
    json_file = _json_file_of(name)
    if json_file:
        problem = diagnose_coco_json(json_file) if os.path.isfile(json_file) else "does not exist"
        if problem:
            raise DatasetError(f"Dataset {name!r}: {json_file} {problem}.") from cause
        raise DatasetError(
            f"Dataset {name!r}: loading {json_file} failed ({type(cause).__name__}: {cause})"
        ) from cause
    raise DatasetError(
        f"Dataset {name!r}: loading failed ({type(cause).__name__}: {cause})"
    ) from cause


def image_size_from_header(path):
    """(width, height) of an image as ``detectron2.data.detection_utils.read_image`` would load it
    (EXIF orientation applied), reading only the header."""
    from PIL import Image

    with Image.open(path) as img:
        w, h = img.size
        try:
            orientation = img.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001  (broken EXIF: read_image ignores it too)
            orientation = 1
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return w, h


def _fmt_examples(items, total=None):
    total = len(items) if total is None else total
    shown = "; ".join(items[:_EXAMPLES])
    more = f"; ... ({total - _EXAMPLES} more)" if total > _EXAMPLES else ""
    return shown + more


def _note(counts, examples, key, record, ann, in_image=False):
    """Count one annotation problem of kind ``key``; keep (build) the first few examples only."""
    counts[key] += 1
    if len(examples[key]) < _EXAMPLES:
        bbox = ann["bbox"]
        bbox = list(bbox) if isinstance(bbox, (list, tuple)) else bbox
        where = f"{os.path.basename(str(record.get('file_name')))} bbox {bbox}"
        if in_image:
            where += f" in a {record.get('width')}x{record.get('height')} image"
        examples[key].append(where)


def _clean_annotations(record, counts, examples, num_classes, name, keep_keys=None):
    """The annotations of ``record``, checked (category), cleaned (boxes) and, with
    ``keep_keys``, reduced to those keys. Runs once per annotation of the dataset (860k for
    COCO train): the common case (a valid box inside its image) takes the shortest path."""
    W, H = record.get("width"), record.get("height")
    has_size = W is not None and H is not None
    kept = []
    for k, ann in enumerate(record.get("annotations", [])):
        cat = ann.get("category_id")
        if num_classes is not None and (not isinstance(cat, int) or not 0 <= cat < num_classes):
            raise DatasetError(
                f"Dataset {name!r}: image {record.get('file_name')} annotation {k} has category_id "
                f"{cat!r}, outside the dataset's {num_classes} classes (contiguous ids "
                f"0..{num_classes - 1}). Fix the annotation or the dataset's categories"
            )
        if keep_keys is not None:
            ann = {key: ann[key] for key in keep_keys if key in ann}
        if "bbox" not in ann:
            kept.append(ann)
            continue
        bbox = ann["bbox"]
        mode = ann.get("bbox_mode", _XYWH_ABS)
        if mode is _XYWH_ABS or mode == _XYWH_ABS:
            xywh = True
        elif mode == _XYXY_ABS:
            xywh = False
        else:
            kept.append(ann)
            continue
        try:
            x0, y0, a, b = map(float, bbox)
        except (TypeError, ValueError):
            _note(counts, examples, "invalid", record, ann)
            continue
        x1, y1 = (x0 + a, y0 + b) if xywh else (a, b)
        if not (
            math.isfinite(x0) and math.isfinite(y0) and math.isfinite(x1) and math.isfinite(y1)
        ):
            _note(counts, examples, "invalid", record, ann)
            continue
        if x1 <= x0 or y1 <= y0:
            _note(counts, examples, "degenerate", record, ann)
            continue
        if has_size and not (x0 >= 0.0 and y0 >= 0.0 and x1 <= W and y1 <= H):
            cx0, cy0, cx1, cy1 = (
                min(max(x0, 0.0), W),
                min(max(y0, 0.0), H),
                min(max(x1, 0.0), W),
                min(max(y1, 0.0), H),
            )
            if cx1 <= cx0 or cy1 <= cy0:
                _note(counts, examples, "outside", record, ann, in_image=True)
                continue
            _note(counts, examples, "clipped", record, ann, in_image=True)
            ann = dict(ann)
            ann["bbox"] = [cx0, cy0, cx1 - cx0, cy1 - cy0] if xywh else [cx0, cy0, cx1, cy1]
        kept.append(ann)
    return kept


def check_image_file(record, check_images):
    """None if the image file of ``record`` passes ``check_images`` ("exists": the file exists;
    "size": and its header's size is the record's width x height), else ``(kind, message)``
    with kind "missing", "unreadable" or "mismatched"."""
    path = record.get("file_name")
    if check_images == "none" or path is None:
        return None
    if not os.path.isfile(path):
        return "missing", path
    if check_images == "size" and "width" in record and "height" in record:
        try:
            wh = image_size_from_header(path)
        except Exception as e:  # noqa: BLE001  (PIL.UnidentifiedImageError, OSError, ...)
            return "unreadable", f"{path} ({type(e).__name__}: {e})"
        if wh != (record["width"], record["height"]):
            return (
                "mismatched",
                f"{path} is {wh[0]}x{wh[1]}, the json says {record['width']}x{record['height']}",
            )
    return None


def find_image_problems(
    dicts, check_images, *, share=True, rank=None, world_size=None, all_gather=None
):
    """The records whose image file fails :func:`check_image_file`, as a list of
    ``(index, kind, message)`` sorted by index.

    With several processes (``torch.distributed`` initialised) and ``share``, the work is
    done once for all processes: each process checks a contiguous ``1 / world_size`` of the
    records and the (short) lists of problems are all-gathered (``all_gather``, by default
    ``detectron2.utils.comm.all_gather``), so that every process gets the same, complete result.
    This is then a collective call: every process must make it, with the same records (all
    processes load the same json). ``share=False`` checks every record in this process.
    ``rank``/``world_size`` default to the process group's.
    """
    from detectron2.utils import comm

    if check_images == "none":
        return []
    if not share:
        rank, world_size = 0, 1
    rank = comm.get_rank() if rank is None else rank
    world_size = comm.get_world_size() if world_size is None else world_size
    n = len(dicts)
    lo, hi = n * rank // world_size, n * (rank + 1) // world_size
    local, error = [], None
    try:
        for i in range(lo, hi):
            problem = check_image_file(dicts[i], check_images)
            if problem is not None:
                local.append((i, *problem))
    except Exception as e:  # noqa: BLE001  (re-raised below, after the collective)
        if world_size == 1:
            raise
        error = e
    if world_size > 1:
        gather = comm.all_gather if all_gather is None else all_gather
        gathered = gather((local, None if error is None else f"{type(error).__name__}: {error}"))
        if error is not None:
            raise error
        for r, (_, other_error) in enumerate(gathered):
            if other_error is not None:
                raise DatasetError(f"checking the image files failed in process {r}: {other_error}")
        local = [p for part, _ in gathered for p in part]
        logger.debug(
            "Checked image files %d..%d of %d here, the others in %d other processes",
            lo,
            hi,
            n,
            world_size - 1,
        )
    return sorted(local)


def validate_dataset_dicts(
    dicts,
    name,
    *,
    is_train=True,
    check_images="exists",
    num_classes=None,
    annotation_keys=None,
    share_checks=True,
):
    """Check and clean the dataset dicts of one dataset (see the module docstring).

    Returns a new list (the input is not modified). Raises :class:`DatasetError` for
    problems that must be fixed; logs one warning per kind of problem otherwise.

    Args:
        annotation_keys: if given, the annotations keep only these keys (e.g. no
            ``segmentation`` for a box detector); None keeps them all.
        share_checks: the image files are checked once for all processes, see
            :func:`find_image_problems` (a collective call with several processes).
    """
    json_file = _json_file_of(name)
    src = f" ({json_file})" if json_file else ""
    if not isinstance(dicts, list):
        raise DatasetError(
            f"Dataset {name!r}{src}: its loader returned a {type(dicts).__name__}, not a list of "
            "dicts"
        )
    if len(dicts) == 0:
        raise DatasetError(
            f"Dataset {name!r}{src} has no images. Check the json's 'images' list "
            "(and, for generated datasets, the generation step)"
        )
    check_images = (check_images or "none").lower()
    if check_images not in ("none", "exists", "size"):
        raise DatasetError(
            f"DATASETS.CHECK_IMAGES must be 'none', 'exists' or 'size', got {check_images!r}"
        )
    purpose = "training" if is_train else "evaluation"
    problems = find_image_problems(dicts, check_images, share=share_checks)
    found = {"missing": [], "unreadable": [], "mismatched": []}
    for _, kind, message in problems:
        found[kind].append(message)
    missing, unreadable, mismatched = found["missing"], found["unreadable"], found["mismatched"]
    skip = {i for i, _, _ in problems}
    keep_keys = None if annotation_keys is None else tuple(annotation_keys)
    out = []
    counts, examples = Counter(), {k: [] for k in ("invalid", "degenerate", "outside", "clipped")}
    for i, record in enumerate(dicts):
        if i in skip:
            continue
        if "annotations" in record:
            record = dict(record)
            record["annotations"] = _clean_annotations(
                record, counts, examples, num_classes, name, keep_keys
            )
        out.append(record)

    image_root = os.path.dirname(str(dicts[0].get("file_name", ""))) if dicts else ""
    if missing and len(missing) == len(dicts):
        raise DatasetError(
            f"Dataset {name!r}{src}: none of its {len(dicts)} image files exist (e.g. "
            f"{missing[0]}). Is the image directory right? (files are looked up under {image_root})"
        )
    bad = [
        ("do not exist", missing),
        ("cannot be read", unreadable),
        ("have another size than the json says", mismatched),
    ]
    for what, items in bad:
        if not items:
            continue
        if not is_train:
            raise DatasetError(
                f"Dataset {name!r}{src}, used for {purpose}: {len(items)} of {len(dicts)} images "
                f"{what}: {_fmt_examples(items)}. An evaluation without them would be wrong: "
                "restore the files or remove these images (and their annotations) from the json"
            )
        logger.warning(
            "Dataset %r%s: %d of %d images %s and are left out of training: %s",
            name,
            src,
            len(items),
            len(dicts),
            what,
            _fmt_examples(items),
        )
    if not out:
        raise DatasetError(f"Dataset {name!r}{src}: no usable image is left after the checks above")
    messages = {
        "invalid": "annotations with a bbox that is not 4 finite numbers were dropped",
        "degenerate": "annotations with zero or negative width/height were dropped",
        "outside": "annotations entirely outside their image were dropped",
        "clipped": "boxes extending outside their image were clipped to it",
    }
    for key, text in messages.items():
        if counts[key]:
            logger.warning(
                "Dataset %r%s: %d %s: %s",
                name,
                src,
                counts[key],
                text,
                _fmt_examples(examples[key], counts[key]),
            )
    return out


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off for the block (restored after).

    Loading a COCO-sized json creates tens of millions of objects; each of the collector's
    passes over them (triggered by the allocations themselves) takes longer as they accumulate,
    about half of ``load_coco_json``'s time on COCO train. Dataset dicts hold no reference
    cycles: reference counting frees them all the same.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def print_class_histogram(dataset_dicts, class_names):
    """Detectron2's ``print_instances_class_histogram`` (the same table), in one pass over the
    annotations instead of one ``np.histogram`` per image (3.6 s for COCO train here).
    Returns the number of non-crowd instances."""
    from detectron2.data.build import print_instances_class_histogram

    counts = Counter(
        a["category_id"]
        for d in dataset_dicts
        for a in d.get("annotations", ())
        if not a.get("iscrowd", 0)
    )
    if any(not isinstance(c, int) or not 0 <= c < len(class_names) for c in counts):
        print_instances_class_histogram(dataset_dicts, class_names)  # its own error
    else:  # one record per class, holding as many (shared) annotations as that class has
        print_instances_class_histogram(
            [{"annotations": [{"category_id": c}] * n} for c, n in sorted(counts.items())],
            class_names,
        )
    return sum(counts.values())


def load_dataset_dicts(
    names,
    *,
    is_train=True,
    filter_empty=False,
    check_images="exists",
    annotation_keys=None,
    share_checks=True,
):
    """Like ``detectron2.data.get_detection_dataset_dicts`` (boxes only), with
    :func:`validate_dataset_dicts` applied to each dataset and clear errors.

    ``annotation_keys`` (None: all) are the annotation keys kept. With several processes, the
    image files are checked once for all of them (``share_checks``, see
    :func:`find_image_problems`): every process must then call this function, with the
    same arguments.

    Returns the concatenated, checked dataset dicts.
    """
    with gc_paused():
        return _load_dataset_dicts(
            names, is_train, filter_empty, check_images, annotation_keys, share_checks
        )


def _load_dataset_dicts(names, is_train, filter_empty, check_images, annotation_keys, share_checks):
    from detectron2.data import MetadataCatalog
    from detectron2.data.build import filter_images_with_only_crowd_annotations
    from detectron2.data.detection_utils import check_metadata_consistency

    if isinstance(names, str):
        names = [names]
    if len(names) == 0:
        raise DatasetError(
            "No dataset given (DATASETS.TRAIN / DATASETS.TEST is empty); name a registered dataset"
        )
    all_dicts = []
    for name in names:
        dicts = copy.copy(_load_one(name))
        classes = getattr(MetadataCatalog.get(name), "thing_classes", None)
        dicts = validate_dataset_dicts(
            dicts,
            name,
            is_train=is_train,
            check_images=check_images,
            num_classes=len(classes) if classes is not None else None,
            annotation_keys=annotation_keys,
            share_checks=share_checks,
        )
        all_dicts.extend(dicts)
    has_instances = "annotations" in all_dicts[0]
    if is_train and filter_empty and has_instances:
        before = len(all_dicts)
        all_dicts = filter_images_with_only_crowd_annotations(all_dicts)
        if not all_dicts:
            raise DatasetError(
                f"Datasets {list(names)}: none of the {before} images has a (non-crowd) box left, "
                "and DATALOADER.FILTER_EMPTY_ANNOTATIONS is True, so there is nothing to train on. "
                "Check the annotations (see the warnings above), or set "
                "DATALOADER.FILTER_EMPTY_ANNOTATIONS False"
            )
    if is_train and has_instances:
        if not any(a.get("iscrowd", 0) == 0 for d in all_dicts for a in d.get("annotations", [])):
            logger.warning(
                "Datasets %s: no image has a box; the model will only learn that there is nothing "
                "to detect",
                list(names),
            )
        if all(hasattr(MetadataCatalog.get(n), "thing_classes") for n in names):
            try:
                check_metadata_consistency("thing_classes", names)
            except (AttributeError, AssertionError, ValueError) as e:
                raise DatasetError(
                    f"Datasets {list(names)} have different class lists (thing_classes): {e}"
                ) from e
            print_class_histogram(all_dicts, MetadataCatalog.get(names[0]).thing_classes)
    return all_dicts
