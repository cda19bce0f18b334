"""Data loading that survives bad inputs and resumes reproducibly.

* :mod:`.datasets`: COCO-format datasets registered from a config or the command line;
  class names and class-count checks.
* :mod:`.validation`: load registered datasets with start-up checks and a summary
  (missing files, bad boxes, unknown categories, empty datasets, non-COCO json).
* :mod:`.mapper`: a DatasetMapper whose failures name the image; a resize that never
  produces an empty image; gray/RGBA input normalization.
* :mod:`.loader`: a training loader whose data order is a function of (seed, iteration)
  (bit-identical resume) and which skips unreadable images with a warning.
"""

from .datasets import check_datasets_registered, get_thing_classes, register_coco_datasets  # noqa: F401
from .loader import (  # noqa: F401
    DataLoadingError,
    ResumableBatchSampler,
    ResumableTrainLoader,
    RobustMapDataset,
    build_checked_test_loader,
    build_resumable_train_loader,
)
from .mapper import ImageLoadError, RobustDatasetMapper, SafeResizeShortestEdge, to_three_channels  # noqa: F401
from .validation import DatasetError, diagnose_coco_json, load_dataset_dicts, validate_dataset_dicts  # noqa: F401

__all__ = [
    "register_coco_datasets",
    "check_datasets_registered",
    "get_thing_classes",
    "DataLoadingError",
    "ResumableBatchSampler",
    "ResumableTrainLoader",
    "RobustMapDataset",
    "build_checked_test_loader",
    "build_resumable_train_loader",
    "ImageLoadError",
    "RobustDatasetMapper",
    "SafeResizeShortestEdge",
    "to_three_channels",
    "DatasetError",
    "diagnose_coco_json",
    "load_dataset_dicts",
    "validate_dataset_dicts",
]
