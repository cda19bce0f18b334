"""A training data loader whose data order is a function of (seed, iteration), so that a
resumed run sees exactly the batches an uninterrupted run would have seen, and which
skips images that cannot be read instead of killing a long run.

Detectron2's ``TrainingSampler`` is an infinite seeded stream that restarts from its
beginning when a run is resumed (so a resumed run repeats the first batches), its
augmentations draw from the global NumPy RNG of each worker process (so the random
resize/flip of an image depends on which worker mapped it), and ``AspectRatioGroupedDataset``
batches images in the order workers return them. Here:

* :class:`ResumableBatchSampler` produces the batches' dataset indices itself: an
  infinite sequence of seeded permutations (or repeat-factor epochs), split across ranks
  like ``TrainingSampler``, grouped by aspect ratio at the index level (from the
  dataset dicts' width/height), batch ``i`` being the ``i``-th group completed. Starting
  at iteration ``s`` replays the index stream (cheap: integers only) and skips ``s`` batches.
* :class:`RobustMapDataset` maps ``(index, stream_position)`` with the RNGs (NumPy, Python,
  torch) seeded from ``(seed, stream_position)`` for that one call, so augmentations are
  the same whatever the number of workers and after a resume. An image that fails to load
  is logged (once per file) and replaced by another image chosen from the same seed;
  ``max_consecutive_failures`` failures in a row stop the run with a :class:`DataLoadingError`
  listing the files.

Memory (COCO-sized datasets): the dataset dicts are serialized once, in the main process, into
one NumPy byte buffer + offsets (Detectron2's ``DatasetFromList(serialize=True)``), and the
Python list of dicts is dropped. DataLoader workers share that buffer with the main process
(a forked process only copies the pages it writes to; reading a Python object writes its
reference count, so a list of dicts would be copied page by page into every worker as it reads
them). The sampler's per-image data (aspect-ratio group, repeat factor) are compact arrays
computed before serializing, and the annotation keys the model does not read (``segmentation``
and ``keypoints`` of a box detector, ...) are dropped before that.
"""

import contextlib
import itertools
import logging
import math
import random
from collections import OrderedDict, defaultdict

import numpy as np
import torch
import torch.utils.data as torchdata
from detectron2.utils import comm

__all__ = [
    "DataLoadingError",
    "ResumableBatchSampler",
    "ResumableTrainLoader",
    "RobustMapDataset",
    "build_resumable_train_loader",
    "build_checked_test_loader",
    "annotation_keys_for",
    "seeded_rngs",
    "serialize_records",
]

logger = logging.getLogger(__name__)


class DataLoadingError(RuntimeError):
    """Too many training images in a row could not be loaded."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def _mix(*values):
    """A 32-bit seed from non-negative integers (stable across processes and Python runs)."""
    return int(np.random.SeedSequence([int(v) % (2**63) for v in values]).generate_state(1)[0])


@contextlib.contextmanager
def seeded_rngs(seed):
    """Seed NumPy's, Python's and torch's global RNGs for the block, then restore them."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        np.random.seed(seed)
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def _repeat_factors(dataset_dicts, repeat_thresh, sqrt=True):
    category_freq = defaultdict(int)
    for d in dataset_dicts:
        for c in {a["category_id"] for a in d.get("annotations", [])}:
            category_freq[c] += 1
    n = len(dataset_dicts)
    # Detectron2 after v0.6 has DATALOADER.REPEAT_SQRT (default True, v0.6's behaviour)
    rep = {
        c: max(1.0, (math.sqrt if sqrt else float)(repeat_thresh / (f / n)))
        for c, f in category_freq.items()
    }
    return torch.tensor(
        [
            max([rep[a["category_id"]] for a in d.get("annotations", [])], default=1.0)
            for d in dataset_dicts
        ],
        dtype=torch.float32,
    )


class ResumableBatchSampler(torchdata.Sampler):
    """Infinite batches of ``(dataset_index, stream_position)`` pairs for one rank.

    Args:
        sizes: per image (width, height), for aspect-ratio grouping (None: no grouping).
        num_images: dataset length.
        batch_size: images per batch on this rank.
        seed: seed of the whole stream (the same on all ranks).
        shuffle: shuffle each epoch.
        repeat_factors: optional per-image repeat factors (RepeatFactorTrainingSampler).
        start_iter: the first batch produced is the one of this iteration.
    """

    def __init__(
        self,
        num_images,
        batch_size,
        seed,
        *,
        sizes=None,
        shuffle=True,
        repeat_factors=None,
        rank=None,
        world_size=None,
        start_iter=0,
    ):
        if num_images <= 0:
            raise ValueError("ResumableBatchSampler needs at least one image")
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.num_images = num_images
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.rank = comm.get_rank() if rank is None else rank
        self.world_size = comm.get_world_size() if world_size is None else world_size
        self.start_iter = int(start_iter)
        self._groups = None  # bytes: one aspect-ratio group (0 or 1) per image
        if sizes is not None:
            if isinstance(sizes, np.ndarray):
                self._groups = (sizes[:, 0] <= sizes[:, 1]).astype(np.uint8).tobytes()
            else:
                self._groups = bytes(0 if w > h else 1 for w, h in sizes)
        if repeat_factors is not None:
            repeat_factors = torch.as_tensor(repeat_factors, dtype=torch.float32)
            self._int_part = torch.trunc(repeat_factors)
            self._frac_part = repeat_factors - self._int_part
        self.repeat = repeat_factors is not None

    @property
    def grouped(self):
        """Whether batches are grouped by aspect ratio."""
        return self._groups is not None

    @property
    def groups(self):
        """Per image, its aspect-ratio group (0: landscape, 1: portrait or square), as a new list;
        None without grouping."""
        return None if self._groups is None else list(self._groups)

    def set_start_iter(self, start_iter):
        self.start_iter = int(start_iter)

    def set_seed(self, seed):
        self.seed = int(seed)

    def _epoch_indices(self, g):
        if self.repeat:
            rands = torch.rand(len(self._frac_part), generator=g)
            reps = (self._int_part + (rands < self._frac_part).float()).long()
            indices = torch.repeat_interleave(torch.arange(len(reps)), reps)
        else:
            indices = torch.arange(self.num_images)
        if self.shuffle:
            indices = indices[torch.randperm(len(indices), generator=g)]
        return indices.tolist()

    def _global_stream(self):
        g = torch.Generator()
        g.manual_seed(self.seed)
        pos = 0
        while True:
            epoch = self._epoch_indices(g)
            if not epoch:
                raise ValueError(
                    "an epoch of the training sampler is empty (all repeat factors round to 0)"
                )
            for idx in epoch:
                yield idx, pos
                pos += 1

    def _batches(self):
        stream = itertools.islice(self._global_stream(), self.rank, None, self.world_size)
        if self._groups is None:
            while True:
                yield list(itertools.islice(stream, self.batch_size))
        groups = self._groups
        buckets = ([], [])
        for idx, pos in stream:
            bucket = buckets[groups[idx]]
            bucket.append((idx, pos))
            if len(bucket) == self.batch_size:
                yield bucket[:]
                del bucket[:]

    def __iter__(self):
        return itertools.islice(self._batches(), self.start_iter, None)


def serialize_records(dataset_dicts):
    """The records as Detectron2's ``DatasetFromList(serialize=True)``: one NumPy byte buffer
    of pickled records + their offsets, which DataLoader workers read without copying it."""
    from detectron2.data.common import DatasetFromList

    return DatasetFromList(dataset_dicts, copy=False, serialize=True)


class RobustMapDataset(torchdata.Dataset):
    """Maps ``records[index]`` for keys ``(index, stream_position)`` (see module doc).

    Args:
        dataset_dicts: the records: a list of dataset dicts (serialized here, and not kept:
            see :func:`serialize_records`), or a dataset of records already serialized.
        mapper: maps a record (a fresh copy at each read) to the model's input.
        seed: seed of the augmentations and replacements, with the stream position.
        max_consecutive_failures: images in a row that may fail before
            :class:`DataLoadingError`.
    """

    def __init__(self, dataset_dicts, mapper, seed, max_consecutive_failures=10):
        if isinstance(dataset_dicts, list):
            dataset_dicts = serialize_records(dataset_dicts)
        self.records = dataset_dicts
        self.mapper = mapper
        self.seed = int(seed)
        self.max_consecutive_failures = max(0, int(max_consecutive_failures))
        self._consecutive = []  # reasons of the current run of consecutive failures
        self._reported = OrderedDict()
        self.num_failures = 0

    def __len__(self):
        return len(self.records)

    def _fail(self, record, error):
        name = record.get("file_name", f"image_id {record.get('image_id')}")
        reason = str(error) if error is not None else "the mapper returned None"
        if str(name) not in reason:
            reason = f"{name}: {reason}"
        self.num_failures += 1
        self._consecutive.append(reason)
        if name not in self._reported:
            self._reported[name] = reason
            logger.warning("Skipping training image (another image takes its place): %s", reason)
        if len(self._consecutive) > self.max_consecutive_failures:
            listed = "\n  ".join(self._consecutive[-10:])
            raise DataLoadingError(
                f"{len(self._consecutive)} training images in a row could not be loaded "
                f"(DATALOADER.MAX_CONSECUTIVE_FAILURES is {self.max_consecutive_failures}); the "
                f"data is probably unreachable or broken. Last ones:\n  {listed}\nFix or remove "
                "these images (or the image directory) and resume with --resume."
            )

    def __getitem__(self, key):
        index, pos = key if isinstance(key, tuple) else (key, key)
        for attempt in itertools.count():
            record = self.records[index]
            error = None
            try:
                with seeded_rngs(_mix(self.seed, pos, attempt)):
                    out = self.mapper(record)
            except Exception as e:  # noqa: BLE001  (skip this image, whatever broke)
                out, error = None, e
            if out is not None:
                self._consecutive = []
                return out
            self._fail(record, error)
            index = random.Random(_mix(self.seed, pos, attempt, 1)).randrange(len(self.records))


class ResumableTrainLoader:
    """The training ``DataLoader``, started lazily: iterating it starts the ``DataLoader`` (and
    its worker processes) only when the first batch is asked for. Detectron2's trainer takes
    ``iter(loader)`` when it is built (v0.6), before ``resume_or_load`` knows the iteration to
    resume at; :meth:`set_start_iter` (and the sampler's ``set_seed``) may be called until then.

    Attributes:
        loader: the ``torch.utils.data.DataLoader``.
        batch_sampler: its :class:`ResumableBatchSampler`.
        dataset: its :class:`RobustMapDataset`.
    """

    def __init__(self, loader):
        self.loader = loader
        self.batch_sampler = loader.batch_sampler
        self.dataset = loader.dataset
        self.last_batch = None  # the batch of the current iteration, for error messages

    @property
    def seed(self):
        return self.batch_sampler.seed

    def set_seed(self, seed):
        """Seed of the data order and of the augmentations (before the first batch only)."""
        self.batch_sampler.set_seed(seed)
        self.dataset.seed = int(seed)

    def set_start_iter(self, start_iter):
        """The first batch is the one of iteration ``start_iter`` (before the first batch only)."""
        self.batch_sampler.set_start_iter(start_iter)

    def __iter__(self):
        # a generator: the DataLoader starts at the first next()
        for batch in self.loader:
            self.last_batch = batch
            yield batch


def _trivial_batch_collator(batch):
    return batch


def _worker_init(worker_id):
    from detectron2.data.build import worker_init_reset_seed

    worker_init_reset_seed(worker_id)


def data_seed_from_cfg(cfg):
    """cfg.SEED if set (>= 0), else one random seed shared by all ranks."""
    return cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed() % (2**31)


#: The annotation keys Detectron2's ``DatasetMapper`` (and so :class:`RobustDatasetMapper`) reads
#: for boxes: ``transform_instance_annotations`` / ``annotations_to_instances`` read bbox,
#: bbox_mode and category_id, the mapper drops crowd annotations (iscrowd). Masks add
#: "segmentation", keypoints "keypoints".
BOX_ANNOTATION_KEYS = ("bbox", "bbox_mode", "category_id", "iscrowd")


def annotation_keys_for(cfg):
    """The annotation keys the training mapper of ``cfg`` reads: :data:`BOX_ANNOTATION_KEYS`,
    plus "segmentation" with ``MODEL.MASK_ON`` and "keypoints" with ``MODEL.KEYPOINT_ON``."""
    keys = list(BOX_ANNOTATION_KEYS)
    if cfg.MODEL.MASK_ON:
        keys.append("segmentation")
    if cfg.MODEL.KEYPOINT_ON:
        keys.append("keypoints")
    return tuple(keys)


def build_resumable_train_loader(cfg, mapper=None, dataset_dicts=None, annotation_keys="auto"):
    """The training loader of the module docstring, from a config.

    Args:
        mapper: default :class:`~gfocalv2.data.mapper.RobustDatasetMapper`.
        dataset_dicts: default: ``DATASETS.TRAIN`` loaded and checked by
            :func:`~gfocalv2.data.validation.load_dataset_dicts` (the image files checked once
            for all processes: every process must call this function).
        annotation_keys: the annotation keys kept in the records loaded here; "auto":
            :func:`annotation_keys_for` with the default mapper, all of them with another one;
            None: all of them.

    Returns a :class:`ResumableTrainLoader` (``set_start_iter``, and ``batch_sampler.set_seed``,
    before the first batch).
    """
    from .mapper import RobustDatasetMapper
    from .validation import load_dataset_dicts

    if isinstance(annotation_keys, str) and annotation_keys == "auto":
        annotation_keys = annotation_keys_for(cfg) if mapper is None else None
    if dataset_dicts is None:
        dataset_dicts = load_dataset_dicts(
            cfg.DATASETS.TRAIN,
            is_train=True,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            check_images=cfg.DATASETS.CHECK_IMAGES,
            annotation_keys=annotation_keys,
        )
    if mapper is None:
        mapper = RobustDatasetMapper(cfg, True)
    world_size = comm.get_world_size()
    total = cfg.SOLVER.IMS_PER_BATCH
    if total <= 0 or total % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({total}) must be a positive multiple of the number of GPUs "
            f"({world_size})"
        )
    seed = data_seed_from_cfg(cfg)
    sampler_name = cfg.DATALOADER.SAMPLER_TRAIN
    # what the sampler needs from the records, as compact arrays, before they are serialized
    if sampler_name == "TrainingSampler":
        repeat_factors = None
    elif sampler_name == "RepeatFactorTrainingSampler":
        repeat_factors = _repeat_factors(
            dataset_dicts, cfg.DATALOADER.REPEAT_THRESHOLD, cfg.DATALOADER.REPEAT_SQRT
        )
    else:
        raise ValueError(
            f"DATALOADER.SAMPLER_TRAIN {sampler_name!r}: gfocalv2's resumable loader supports "
            "'TrainingSampler' and 'RepeatFactorTrainingSampler'"
        )
    sizes = None
    if cfg.DATALOADER.ASPECT_RATIO_GROUPING:
        sizes = np.array(
            [(d.get("width", 1), d.get("height", 1)) for d in dataset_dicts], dtype=np.float64
        ).reshape(-1, 2)
    num_images = len(dataset_dicts)
    batch_sampler = ResumableBatchSampler(
        num_images, total // world_size, seed, sizes=sizes, repeat_factors=repeat_factors
    )
    del sizes
    records = serialize_records(dataset_dicts)
    del dataset_dicts  # the list of dicts (when loaded here) is freed: only the bytes are kept
    dataset = RobustMapDataset(records, mapper, seed, cfg.DATALOADER.MAX_CONSECUTIVE_FAILURES)
    logger.info(
        "Training data: %d images, %d per batch per GPU, seed %d, resumable order (%s%s)",
        num_images,
        total // world_size,
        seed,
        sampler_name,
        ", aspect-ratio grouping" if batch_sampler.grouped else "",
    )
    return ResumableTrainLoader(
        torchdata.DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
            collate_fn=_trivial_batch_collator,
            worker_init_fn=_worker_init,
        )
    )


def build_checked_test_loader(cfg, dataset_name, mapper=None):
    """Detectron2's test loader, over dataset dicts checked by :func:`load_dataset_dicts`
    (missing images are an error: the evaluation would be wrong; the image files are checked
    once for all processes, so every process must build it, as Detectron2's trainer does) and
    with the :class:`~gfocalv2.data.mapper.RobustDatasetMapper` (failures name the file)."""
    from detectron2.data import build_detection_test_loader

    from .mapper import RobustDatasetMapper
    from .validation import load_dataset_dicts

    dicts = load_dataset_dicts(
        [dataset_name], is_train=False, check_images=cfg.DATASETS.CHECK_IMAGES
    )
    if mapper is None:
        mapper = RobustDatasetMapper(cfg, False)
    return build_detection_test_loader(dicts, mapper=mapper, num_workers=cfg.DATALOADER.NUM_WORKERS)
