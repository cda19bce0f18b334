"""COCO-scale training data (issue 21): the records are serialized once (no Python list of dicts
kept, which DataLoader workers would copy page by page), the annotation keys a box detector does
not read are dropped before, the mapping of (seed, position) is the one of the list of dicts,
and the image files are checked once for all processes (each process a share, then all-gather).
The loader's order and resume: test_loader.py; the checks' messages: test_dataset_checks.py."""

import copy
import gc
import itertools
import multiprocessing
import os
import random
import threading
import types
from datetime import timedelta

import numpy as np
import pytest
import torch

from tests.utils.reliability import VARIED_SIZES, training_cfg, write_coco

from gfocalv2.data import (
    DatasetError,
    RobustDatasetMapper,
    RobustMapDataset,
    build_resumable_train_loader,
    load_dataset_dicts,
)
from gfocalv2.data.loader import (
    BOX_ANNOTATION_KEYS,
    ResumableBatchSampler,
    _mix,
    annotation_keys_for,
    seeded_rngs,
)
from gfocalv2.data.validation import find_image_problems, gc_paused, print_class_histogram

CLASSES = ["a", "b", "c"]


def _coco_like_dicts(image_dir, data):
    """Dataset dicts as load_coco_json makes them (contiguous ids), plus COCO's other fields:
    polygons, keypoints, an extra per-annotation key."""
    from detectron2.structures import BoxMode

    ids = {c["id"]: i for i, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    dicts = []
    for img in data["images"]:
        anns = []
        for a in data["annotations"]:
            if a["image_id"] != img["id"]:
                continue
            x, y, w, h = a["bbox"]
            anns.append(
                {
                    "iscrowd": a["iscrowd"],
                    "bbox": list(a["bbox"]),
                    "category_id": ids[a["category_id"]],
                    "bbox_mode": BoxMode.XYWH_ABS,
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                    "keypoints": [x + 1.5, y + 1.5, 2] * 3,
                    "attributes": {"occluded": False, "note": "not read by the mapper"},
                }
            )
        dicts.append(
            {
                "file_name": os.path.join(image_dir, img["file_name"]),
                "height": img["height"],
                "width": img["width"],
                "image_id": img["id"],
                "annotations": anns,
            }
        )
    return dicts


@pytest.fixture(scope="module")
def full_fields(tmp_path_factory):
    """A dataset registered with a loader that returns records with every COCO field (and one
    more): (name, the records as registered)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    root = tmp_path_factory.mktemp("coco_scale")
    _, image_dir, data = write_coco(root, sizes=VARIED_SIZES, boxes_per_image=3)
    dicts = _coco_like_dicts(image_dir, data)
    name = "coco_scale_full_fields"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: copy.deepcopy(dicts))
    MetadataCatalog.get(name).thing_classes = CLASSES
    return name, dicts


def _reachable(root, skip):
    """Objects reachable from ``root`` through gc.get_referents, not entering ``skip``,
    classes, modules or functions."""
    seen, todo, out = {id(s) for s in skip}, [root], []
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(
            obj, (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)
        ):
            continue
        seen.add(id(obj))
        out.append(obj)
        todo.extend(gc.get_referents(obj))
        assert len(out) < 200_000, "walked too far"
    return out


# ------------------------------------------------------------------------ serialized records
def test_the_training_dataset_holds_serialized_records_only(full_fields, tmp_path):
    name, registered = full_fields
    loader = build_resumable_train_loader(training_cfg(tmp_path, name, 8))
    dataset = loader.dataset
    reachable = _reachable(dataset, skip=[dataset.mapper])
    assert not [o for o in reachable if isinstance(o, dict) and "file_name" in o]
    assert not [o for o in reachable if isinstance(o, list) and o and isinstance(o[0], dict)]
    # Detectron2 0.6 keeps the pickled records in a NumPy byte array, later versions in a torch one
    buffers = [o for o in reachable if isinstance(o, np.ndarray) and o.dtype == np.uint8]
    buffers += [
        o.numpy() for o in reachable if isinstance(o, torch.Tensor) and o.dtype == torch.uint8
    ]
    assert buffers and max(b.nbytes for b in buffers) > 1000  # the pickled records
    # what the records hold: the loaded ones, in order
    assert len(dataset) == len(registered)
    assert [dataset.records[i]["file_name"] for i in range(len(dataset))] == [
        d["file_name"] for d in registered
    ]
    # the sampler's per-image data are compact too
    assert isinstance(loader.batch_sampler._groups, bytes)
    assert loader.batch_sampler.groups == [0 if d["width"] > d["height"] else 1 for d in registered]


def test_fields_the_box_mapper_does_not_read_are_dropped(full_fields, tmp_path):
    name, registered = full_fields
    cfg = training_cfg(tmp_path, name, 8)
    assert not cfg.MODEL.MASK_ON and not cfg.MODEL.KEYPOINT_ON
    dataset = build_resumable_train_loader(cfg).dataset
    for i, original in enumerate(registered):
        record = dataset.records[i]
        # image-level fields are kept
        assert {k: v for k, v in record.items() if k != "annotations"} == {
            k: v for k, v in original.items() if k != "annotations"
        }
        assert len(record["annotations"]) == len(original["annotations"])
        for ann, orig in zip(record["annotations"], original["annotations"]):
            assert set(ann) == set(BOX_ANNOTATION_KEYS)  # no segmentation/keypoints/attributes
            assert ann == {k: orig[k] for k in BOX_ANNOTATION_KEYS}

    # masks / keypoints keep what they need
    masks = cfg.clone()
    masks.defrost()
    masks.MODEL.MASK_ON = True
    assert annotation_keys_for(masks) == (*BOX_ANNOTATION_KEYS, "segmentation")
    masks.MODEL.KEYPOINT_ON = True
    assert annotation_keys_for(masks) == (*BOX_ANNOTATION_KEYS, "segmentation", "keypoints")
    # another mapper may read anything: nothing is dropped
    custom = build_resumable_train_loader(cfg, mapper=RobustDatasetMapper(cfg, True)).dataset
    assert set(custom.records[0]["annotations"][0]) == set(registered[0]["annotations"][0])
    # evaluation data (the test loader's) keep everything
    test_dicts = load_dataset_dicts([name], is_train=False)
    assert (
        test_dicts[0]["annotations"][0]["segmentation"]
        == registered[0]["annotations"][0]["segmentation"]
    )


def _reference_item(dicts, mapper, seed, index, pos):
    """RobustMapDataset.__getitem__ as it was over the Python list of dicts (before
    serialization): the same seeding and the same replacement rule."""
    for attempt in itertools.count():
        try:
            with seeded_rngs(_mix(seed, pos, attempt)):
                out = mapper(dicts[index])
        except Exception:  # noqa: BLE001
            out = None
        if out is not None:
            return out
        index = random.Random(_mix(seed, pos, attempt, 1)).randrange(len(dicts))


def _summary(out):
    inst = out["instances"]
    return (
        out["file_name"],
        out["image"].shape,
        out["image"].to(torch.int64).sum().item(),
        inst.gt_boxes.tensor.tolist(),
        inst.gt_classes.tolist(),
    )


def test_the_mapping_is_the_one_of_the_list_of_dicts(full_fields, tmp_path):
    """Same (seed, position): same image, augmentation and boxes as before serialization,
    unreadable images replaced by the same images."""
    name, _ = full_fields
    cfg = training_cfg(tmp_path, name, 8)
    dicts = load_dataset_dicts([name])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    dicts[3] = dict(dicts[3], file_name=str(broken))
    mapper = RobustDatasetMapper(cfg, True)
    dataset = RobustMapDataset(copy.deepcopy(dicts), mapper, seed=5, max_consecutive_failures=3)
    keys = [(i, pos) for i in range(len(dicts)) for pos in (0, 7, 12345)]
    got = [_summary(dataset[key]) for key in keys]
    expected = [_summary(_reference_item(dicts, mapper, 5, *key)) for key in keys]
    assert got == expected
    assert dataset.num_failures >= 3  # (3, 0), (3, 7), (3, 12345) at least
    assert all(g[0] != str(broken) for g in got)
    assert len({g[1:3] for g in got}) > len(dicts)  # the augmentations do vary with the position


def test_sizes_as_an_array_group_as_sizes_as_a_list():
    sizes = [(80, 48), (48, 80), (64, 64), (80, 48), (48, 80), (80, 48), (64, 64), (48, 80)]

    def batches(s):
        sampler = ResumableBatchSampler(8, 3, 2, sizes=s, rank=0, world_size=1)
        return list(itertools.islice(iter(sampler), 12))

    assert batches(np.array(sizes, dtype=np.float64)) == batches(sizes)


# ------------------------------------------------------------------------ image checks, shared
def _fake_all_gathers(world_size):
    """all_gather functions of ``world_size`` ranks running in threads: each returns every
    rank's object, in rank order, once all have called it."""
    barrier = threading.Barrier(world_size, timeout=30)
    slots = [None] * world_size

    def for_rank(rank):
        def all_gather(obj):
            slots[rank] = obj
            barrier.wait()
            out = list(slots)
            barrier.wait()
            return out

        return all_gather

    return for_rank


def _run_ranks(world_size, fn):
    """fn(rank) in one thread per rank; returns each rank's result or exception."""
    results = [None] * world_size

    def target(rank):
        try:
            results[rank] = fn(rank)
        except Exception as e:  # noqa: BLE001
            results[rank] = e

    threads = [
        threading.Thread(target=target, args=(r,), name=f"rank{r}") for r in range(world_size)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank hangs"
    return results


@pytest.mark.parametrize("check_images", ["exists", "size"])
def test_image_checks_are_split_between_processes_and_shared(
    full_fields, tmp_path, monkeypatch, check_images
):
    _, registered = full_fields
    dicts = copy.deepcopy(registered) * 2  # 16 records
    dicts[1] = dict(dicts[1], file_name=str(tmp_path / "gone.png"))
    dicts[14] = dict(dicts[14], file_name=str(tmp_path / "gone_too.png"))
    dicts[9] = dict(dicts[9], width=dicts[9]["width"] + 1)  # a wrong size (found by "size")
    alone = find_image_problems(dicts, check_images, share=False)
    assert [i for i, _, _ in alone] == ([1, 9, 14] if check_images == "size" else [1, 14])

    checked = {}
    real_isfile = os.path.isfile

    def isfile(path):
        checked.setdefault(threading.current_thread().name, []).append(str(path))
        return real_isfile(path)

    monkeypatch.setattr(os.path, "isfile", isfile)
    gathers = _fake_all_gathers(3)
    results = _run_ranks(
        3,
        lambda r: find_image_problems(
            dicts, check_images, rank=r, world_size=3, all_gather=gathers(r)
        ),
    )
    assert results == [alone] * 3  # every process gets the whole result
    shares = [checked.get(f"rank{r}", []) for r in range(3)]
    assert sorted(itertools.chain(*shares)) == sorted(d["file_name"] for d in dicts)
    assert [len(s) for s in shares] == [5, 5, 6]  # each file checked once, in one process


def test_an_error_while_checking_stops_every_process(full_fields, monkeypatch):
    from gfocalv2.data import validation

    _, registered = full_fields
    dicts = copy.deepcopy(registered)
    real = validation.check_image_file

    def check(record, check_images):
        if record is dicts[-1]:
            raise RuntimeError("the disk went away")
        return real(record, check_images)

    monkeypatch.setattr(validation, "check_image_file", check)
    gathers = _fake_all_gathers(2)
    results = _run_ranks(
        2,
        lambda r: find_image_problems(dicts, "exists", rank=r, world_size=2, all_gather=gathers(r)),
    )
    assert isinstance(results[1], RuntimeError) and "the disk went away" in str(results[1])
    assert isinstance(results[0], DatasetError)
    assert "failed in process 1: RuntimeError: the disk went away" in str(results[0])


def _load_in_process(rank, world_size, init_file, name, image_dir, queue):
    import torch.distributed as dist

    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=60),
        )
        checked, real_isfile = [], os.path.isfile

        def isfile(path):
            if str(path).startswith(image_dir):
                checked.append(str(path))
            return real_isfile(path)

        os.path.isfile = isfile  # this process only
        dicts = load_dataset_dicts([name])
        queue.put((rank, [d["file_name"] for d in dicts], checked, None))
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001
        queue.put((rank, None, None, repr(e)))


def test_two_gloo_processes_check_each_image_once(tmp_path):
    """Real processes (fork) with a gloo process group: each checks half of the files and both
    get the same records (the missing image left out in both)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from tests.utils.reliability import dump, register

    json_path, image_dir, data = write_coco(tmp_path, sizes=VARIED_SIZES)
    data = copy.deepcopy(data)
    data["images"][5]["file_name"] = "missing.png"
    name = register("coco_scale_two_procs", dump(data, tmp_path / "two.json"), image_dir)
    procs = []
    try:
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        procs = [
            ctx.Process(
                target=_load_in_process,
                args=(r, 2, str(tmp_path / "store"), name, str(image_dir), queue),
            )
            for r in range(2)
        ]
        for p in procs:
            p.start()
        results = sorted(queue.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert [err for *_, err in results] == [None, None]
    (_, files0, checked0, _), (_, files1, checked1, _) = results
    assert files0 == files1 and len(files0) == 7
    assert not any(f.endswith("missing.png") for f in files0)
    assert len(checked0) == len(checked1) == 4 and not set(checked0) & set(checked1)


# ------------------------------------------------------------------------ loading speed helpers
def test_class_histogram_is_detectron2s_table(full_fields, monkeypatch):
    import detectron2.data.build as d2_build

    _, registered = full_fields
    dicts = copy.deepcopy(registered)
    dicts[0]["annotations"][0]["iscrowd"] = 1  # crowd boxes are not counted
    logged = []
    monkeypatch.setattr(d2_build, "log_first_n", lambda *args, **kwargs: logged.append(args[1]))
    d2_build.print_instances_class_histogram(dicts, CLASSES)
    total = print_class_histogram(dicts, CLASSES)
    assert len(logged) == 2 and logged[0] == logged[1]
    assert total == sum(len(d["annotations"]) for d in dicts) - 1


def test_gc_paused_restores_the_collector():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError), gc_paused():
        raise ValueError
    assert gc.isenabled()
