"""gfocalv2.data.loader.ResumableBatchSampler on its own (the per-process split of one global
stream, resuming, seeding, aspect-ratio grouping, bad arguments) and ResumableTrainLoader
(set_start_iter still takes effect between iter() and the first batch)."""

import itertools

import pytest
import torch.utils.data as torchdata

from gfocalv2.data.loader import ResumableBatchSampler, ResumableTrainLoader

#: Repeat factors of 8 images: fractional parts make the epochs' lengths vary with the seed.
REPEAT = [1.0, 2.5, 0.5, 1.0, 3.0, 1.0, 0.25, 1.75]

#: (width, height) of 8 images: landscape (w > h) is group 0, portrait and square are group 1.
SIZES = [(80, 48), (48, 80), (64, 64), (80, 48), (48, 80), (80, 48), (64, 64), (48, 80)]


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def sampler(batch_size=2, seed=3, rank=0, world_size=1, **kwargs):
    return ResumableBatchSampler(8, batch_size, seed, rank=rank, world_size=world_size, **kwargs)


@pytest.mark.parametrize("repeat", [None, REPEAT], ids=["no-repeat", "repeat-factors"])
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffle", "in-order"])
def test_two_processes_split_the_global_stream_of_one(shuffle, repeat):
    kwargs = dict(shuffle=shuffle, repeat_factors=repeat)
    iterations = 12
    single = take(sampler(6, **kwargs), iterations)
    ranks = [take(sampler(3, rank=r, world_size=2, **kwargs), iterations) for r in (0, 1)]
    for it in range(iterations):
        a, b = ranks[0][it], ranks[1][it]
        assert len(a) == len(b) == 3
        assert not {pos for _, pos in a} & {pos for _, pos in b}  # disjoint stream positions
        # the global stream is dealt out element by element: rank r takes positions r, r + 2, ...
        assert [pos for _, pos in a] == [6 * it, 6 * it + 2, 6 * it + 4]
        assert [pos for _, pos in b] == [6 * it + 1, 6 * it + 3, 6 * it + 5]
        assert [x for pair in zip(a, b) for x in pair] == single[it]
    assert [pos for batch in single for _, pos in batch] == list(range(6 * iterations))


def test_in_order_stream_without_repeat_cycles_over_the_images():
    batches = take(sampler(3, shuffle=False), 8)
    assert [idx for batch in batches for idx, _ in batch] == [k % 8 for k in range(24)]


def test_shuffled_epochs_are_permutations_that_differ():
    stream = [idx for batch in take(sampler(4), 8) for idx, _ in batch]  # 4 epochs of 8 images
    epochs = [stream[k : k + 8] for k in range(0, 32, 8)]
    assert all(sorted(e) == list(range(8)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1 and epochs[0] != list(range(8))


def test_repeat_factor_epochs_repeat_each_image_floor_or_ceil_times():
    """In order (no shuffle), an epoch is each image repeated int(r) or int(r) + 1 times,
    ascending."""
    stream = [
        idx
        for batch in take(sampler(1, shuffle=False, repeat_factors=REPEAT), 200)
        for idx, _ in batch
    ]
    epochs, current = [], [stream[0]]
    for prev, idx in zip(stream, stream[1:]):
        if idx < prev:  # a new epoch starts again from the lowest index
            epochs.append(current)
            current = []
        current.append(idx)
    assert len(epochs) >= 10
    counts = {i: set() for i in range(8)}
    for epoch in epochs:
        for i, r in enumerate(REPEAT):
            n = epoch.count(i)
            assert int(r) <= n <= int(r) + (r != int(r)), (i, r, n)
            counts[i].add(n)
    assert counts[4] == {3} and counts[0] == {1}  # whole factors: always that many
    assert counts[1] == {2, 3} and counts[2] == {0, 1}  # fractional: both, depending on the epoch


@pytest.mark.parametrize("world_size, grouping", [(1, False), (2, False), (2, True)])
def test_set_start_iter_equals_skipping_batches(world_size, grouping):
    kwargs = dict(
        world_size=world_size,
        rank=world_size - 1,
        repeat_factors=REPEAT,
        sizes=SIZES if grouping else None,
    )
    full = take(sampler(**kwargs), 15)
    resumed = sampler(**kwargs)
    resumed.set_start_iter(6)
    assert take(resumed, 9) == full[6:]
    assert take(sampler(start_iter=6, **kwargs), 9) == full[6:]
    resumed.set_start_iter(0)
    assert take(resumed, 15) == full


def test_set_seed_changes_the_order():
    s = sampler(4)
    seed_3 = take(s, 6)
    assert take(sampler(4, seed=3), 6) == seed_3  # the order is a function of the seed only
    s.set_seed(4)
    seed_4 = take(s, 6)
    assert s.seed == 4 and seed_4 != seed_3
    assert seed_4 == take(sampler(4, seed=4), 6)
    # the same positions, other images
    assert [pos for b in seed_4 for _, pos in b] == [pos for b in seed_3 for _, pos in b]


def test_aspect_ratio_grouping_batches_one_group_only():
    s = sampler(2, shuffle=False, sizes=SIZES)
    assert s.groups == [0, 1, 1, 0, 1, 0, 1, 1]
    # in order: a batch is the next two images of one group, in the order the groups fill up
    assert take(s, 5) == [
        [(1, 1), (2, 2)],
        [(0, 0), (3, 3)],
        [(4, 4), (6, 6)],
        [(5, 5), (0, 8)],
        [(7, 7), (1, 9)],
    ]
    for world_size, rank in ((1, 0), (2, 0), (2, 1)):
        shuffled = take(
            sampler(3, rank=rank, world_size=world_size, sizes=SIZES, repeat_factors=REPEAT), 30
        )
        assert all(len(batch) == 3 for batch in shuffled)
        assert all(len({s.groups[idx] for idx, _ in batch}) == 1 for batch in shuffled)
        positions = [pos for batch in shuffled for _, pos in batch]
        assert len(set(positions)) == len(positions)  # each stream position at most once
        assert all(pos % world_size == rank for pos in positions)


@pytest.mark.parametrize(
    "num_images, batch_size, message",
    [
        (0, 2, "needs at least one image"),
        (-1, 2, "needs at least one image"),
        (8, 0, "batch size must be positive, got 0"),
        (8, -2, "batch size must be positive, got -2"),
    ],
    ids=["no-image", "negative-count", "batch-size-0", "negative-batch-size"],
)
def test_bad_arguments_are_refused(num_images, batch_size, message):
    with pytest.raises(ValueError, match=message):
        ResumableBatchSampler(num_images, batch_size, 0, rank=0, world_size=1)


def test_repeat_factors_that_all_round_to_zero_are_refused():
    s = ResumableBatchSampler(2, 1, 0, rank=0, world_size=1, repeat_factors=[0.0, 0.0])
    with pytest.raises(ValueError, match="an epoch of the training sampler is empty"):
        take(s, 1)


# ----------------------------------------------------------------------------- ResumableTrainLoader
class _Keys(torchdata.Dataset):
    """Returns the key it is given: the loader's batches are the sampler's."""

    def __len__(self):
        return 8

    def __getitem__(self, key):
        return key


def _loader(**kwargs):
    s = sampler(2, **kwargs)
    return ResumableTrainLoader(
        torchdata.DataLoader(_Keys(), batch_sampler=s, collate_fn=lambda b: b)
    )


def test_loader_start_iter_set_after_iter_before_the_first_batch_takes_effect():
    """Detectron2 0.6's trainer calls iter(loader) in its constructor, before resume_or_load."""
    expected = take(sampler(2), 10)
    loader = _loader()
    it = iter(loader)
    loader.set_start_iter(4)
    assert loader.batch_sampler.start_iter == 4
    assert [next(it) for _ in range(6)] == expected[4:]
    loader.set_start_iter(0)  # a new iterator starts where the sampler says
    it = iter(loader)
    assert [next(it) for _ in range(10)] == expected


def test_loader_seed_set_after_iter_before_the_first_batch_takes_effect():
    loader = _loader()
    it = iter(loader)
    loader.batch_sampler.set_seed(11)
    assert loader.seed == 11
    assert [next(it) for _ in range(5)] == take(sampler(2, seed=11), 5)
