"""The training loader built from a config (gfocalv2.data.build_resumable_train_loader): its
batches, augmentations included, depend only on the seed and the iteration, not on where a run
started nor on the number of workers. (The sampler on its own: test_sampler.py.)"""

import itertools

import pytest

from tests.utils.reliability import VARIED_SIZES, training_cfg


@pytest.fixture(scope="module")
def dataset(coco_dataset):
    return coco_dataset("loader_train", sizes=VARIED_SIZES).name


def _cfg(out, dataset, max_iter, extra=()):
    return training_cfg(out, dataset, max_iter, extra)


def test_data_order_depends_only_on_seed_and_iteration(dataset, tmp_path):
    from gfocalv2.data import build_resumable_train_loader

    cfg = _cfg(tmp_path, dataset, 8)
    loader = build_resumable_train_loader(cfg)
    it = iter(loader)
    full = [
        [
            (d["file_name"], tuple(d["image"].shape), d["instances"].gt_boxes.tensor.sum().item())
            for d in next(it)
        ]
        for _ in range(6)
    ]
    loader.batch_sampler.set_start_iter(3)
    it = iter(loader)
    tail = [
        [
            (d["file_name"], tuple(d["image"].shape), d["instances"].gt_boxes.tensor.sum().item())
            for d in next(it)
        ]
        for _ in range(3)
    ]
    assert tail == full[3:]
    sampler = loader.batch_sampler
    sampler.set_start_iter(0)
    batches = list(itertools.islice(iter(sampler), 20))
    assert all(
        len({sampler.groups[i] for i, _ in batch}) == 1 for batch in batches
    )  # aspect-ratio grouping
    positions = [pos for batch in batches for _, pos in batch]
    assert len(set(positions)) == len(positions)  # each stream position is used once


def test_data_order_does_not_depend_on_the_number_of_workers(dataset, tmp_path):
    from gfocalv2.data import build_resumable_train_loader

    def batches(workers):
        cfg = _cfg(tmp_path, dataset, 8, extra=["DATALOADER.NUM_WORKERS", str(workers)])
        it = iter(build_resumable_train_loader(cfg))
        return [
            [
                (
                    d["file_name"],
                    d["image"].sum().item(),
                    d["instances"].gt_boxes.tensor.sum().item(),
                )
                for d in next(it)
            ]
            for _ in range(4)
        ]

    assert batches(0) == batches(2)
