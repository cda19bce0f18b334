"""Evaluation as Detectron2 does it (``COCOEvaluator``), with one fix: a model that predicts
nothing on a whole dataset gets AP 0 for every metric, not NaN or ``{}``."""

import logging
import math
import os
from collections import OrderedDict

from detectron2.evaluation import COCOEvaluator, DatasetEvaluator
from detectron2.utils import comm

__all__ = ["NothingPredictedEvaluator", "build_coco_evaluator"]

logger = logging.getLogger(__name__)


def build_coco_evaluator(cfg, dataset_name, output_folder=None):
    """Detectron2's ``COCOEvaluator`` for boxes, writing to ``OUTPUT_DIR/inference`` (one folder per
    dataset when ``DATASETS.TEST`` names several), wrapped in :class:`NothingPredictedEvaluator`."""
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        if len(cfg.DATASETS.TEST) > 1:
            output_folder = os.path.join(output_folder, dataset_name)
    evaluator = COCOEvaluator(dataset_name, tasks=("bbox",), output_dir=output_folder)
    return NothingPredictedEvaluator(evaluator, dataset_name)


class NothingPredictedEvaluator(DatasetEvaluator):
    """Wraps an evaluator; when the model predicted no instance on the whole dataset, every
    metric of the result (Detectron2's COCOEvaluator gives NaN or ``{}``) becomes 0.0."""

    METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

    def __init__(self, evaluator, dataset_name):
        self.evaluator = evaluator
        self.dataset_name = dataset_name
        self._num_instances = 0
        self._num_images = 0

    def reset(self):
        self._num_instances = 0
        self._num_images = 0
        self.evaluator.reset()

    def process(self, inputs, outputs):
        self._num_images += len(outputs)
        for out in outputs:
            if isinstance(out, dict) and "instances" in out:
                self._num_instances += len(out["instances"])
            else:
                self._num_instances += 1  # not a detector's output: leave it alone
        self.evaluator.process(inputs, outputs)

    def evaluate(self):
        results = self.evaluator.evaluate()
        total = (
            sum(comm.all_gather(self._num_instances))
            if comm.get_world_size() > 1
            else self._num_instances
        )
        images = (
            sum(comm.all_gather(self._num_images))
            if comm.get_world_size() > 1
            else self._num_images
        )
        if total > 0 or not comm.is_main_process():
            return results
        from detectron2.data import MetadataCatalog

        results = OrderedDict(results or {})
        bbox = OrderedDict((k, 0.0) for k in self.METRICS)
        for name in getattr(MetadataCatalog.get(self.dataset_name), "thing_classes", None) or []:
            bbox[f"AP-{name}"] = 0.0
        for task, values in list(results.items()):
            if isinstance(values, dict):
                results[task] = OrderedDict(
                    (k, 0.0 if isinstance(v, float) and math.isnan(v) else v)
                    for k, v in values.items()
                )
                for k in bbox:
                    results[task].setdefault(k, 0.0)
        results.setdefault("bbox", bbox)
        logger.warning(
            "The model predicted no box on %s (%d images): every AP is reported as 0",
            self.dataset_name,
            images,
        )
        return results
