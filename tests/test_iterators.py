import numpy as np
import pytest

from rnnlm.iterators import BatchIterator


@pytest.mark.parametrize("mode", ["sequential", "random"])
def test_windows_are_slices_and_targets_shifted(mode):
    ids = np.arange(5000, dtype=np.int64)
    it = BatchIterator(ids, batch_size=4, num_steps=7, mode=mode, seed=3)
    for epoch in range(3):
        n = 0
        for X, Y in it.epoch(epoch):
            assert X.shape == Y.shape == (4, 7)
            for x, y in zip(X.numpy(), Y.numpy()):
                start = x[0]  # the corpus is arange, so a window's first id is its index
                assert np.array_equal(x, ids[start: start + 7])
                assert np.array_equal(y, ids[start + 1: start + 8])
            n += 1
        assert n == it.num_batches(epoch) > 0


def test_sequential_lanes_continue_and_offset_in_range():
    ids = np.arange(2000, dtype=np.int64)
    it = BatchIterator(ids, batch_size=5, num_steps=9, mode="sequential", seed=0)
    offsets = set()
    for epoch in range(60):
        batches = list(it.epoch(epoch))
        offsets.add(int(batches[0][0][0, 0]))
        for prev, cur in zip(batches, batches[1:]):
            assert np.array_equal(cur[0][:, 0].numpy(), prev[0][:, -1].numpy() + 1)
    assert offsets <= set(range(10)) and len(offsets) > 5  # offset in [0, num_steps]


def test_random_windows_never_overlap_and_offsets_in_range():
    ids = np.arange(3000, dtype=np.int64)
    it = BatchIterator(ids, batch_size=6, num_steps=11, mode="random", seed=1)
    offsets = set()
    for epoch in range(40):
        starts = [int(s) for X, _ in it.epoch(epoch) for s in X[:, 0]]
        assert len(starts) == len(set(starts))
        s = np.sort(starts)
        assert np.all(np.diff(s) % 11 == 0) and np.all(np.diff(s) >= 11)
        offsets.add(int(s[0]) % 11)
    assert offsets <= set(range(11)) and len(offsets) > 5


def test_random_order_is_shuffled_and_seeded():
    ids = np.arange(3000, dtype=np.int64)
    a = [X.clone() for X, _ in BatchIterator(ids, 4, 5, "random", seed=7).epoch(0)]
    b = [X.clone() for X, _ in BatchIterator(ids, 4, 5, "random", seed=7).epoch(0)]
    assert all((x == y).all() for x, y in zip(a, b))
    firsts = [int(X[0, 0]) for X in a]
    assert firsts != sorted(firsts)


@pytest.mark.parametrize("mode", ["sequential", "random"])
def test_resume_from_a_batch_replays_the_rest(mode):
    ids = np.arange(3000, dtype=np.int64)
    it = BatchIterator(ids, 4, 5, mode, seed=2)
    full = [X for X, _ in it.epoch(4)]
    rest = [X for X, _ in it.epoch(4, start_batch=3)]
    assert len(rest) == len(full) - 3
    assert all((x == y).all() for x, y in zip(full[3:], rest))


@pytest.mark.parametrize("mode", ["sequential", "random"])
def test_ranks_split_the_global_batch(mode):
    ids = np.arange(4000, dtype=np.int64)
    whole = list(BatchIterator(ids, 8, 6, mode, seed=5).epoch(2))
    parts = [list(BatchIterator(ids, 8, 6, mode, seed=5, rank=r, world_size=2).epoch(2))
             for r in range(2)]
    for i, (X, Y) in enumerate(whole):
        assert (X == np.concatenate([parts[0][i][0], parts[1][i][0]])).all()
        assert (Y == np.concatenate([parts[0][i][1], parts[1][i][1]])).all()
