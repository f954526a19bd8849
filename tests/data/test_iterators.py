import numpy as np
import pytest

from rnnlm.data.iterators import BatchIterator, VariableLength


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


# --- variable-length windows (AWD-LSTM, train.truncation=variable_length) --------------------

AWD = VariableLength(p_full=0.95, std=5.0, min_len=5)


def test_variable_length_lanes_stay_contiguous_and_cover_the_lanes():
    ids = np.arange(20000, dtype=np.int64)
    it = BatchIterator(ids, 4, 20, "sequential", seed=1, variable_length=AWD)
    fixed = BatchIterator(ids, 4, 20, "sequential", seed=1)
    lengths = []
    for epoch in range(5):
        batches = list(it.epoch(epoch))
        # the same offset as the fixed iterator: only the cuts move
        assert int(batches[0][0][0, 0]) == int(next(fixed.epoch(epoch))[0][0, 0])
        for X, Y in batches:
            assert X.shape == Y.shape and X.shape[1] >= 5
            assert np.array_equal(Y.numpy(), X.numpy() + 1)  # ids = arange: shifted targets
            lengths.append(X.shape[1])
        for prev, cur in zip(batches, batches[1:]):
            assert np.array_equal(cur[0][:, 0].numpy(), prev[0][:, -1].numpy() + 1)
        lane_len = (len(ids) - int(batches[0][0][0, 0]) - 1) // 4
        left = lane_len - sum(X.shape[1] for X, _ in batches)
        assert 0 <= left < 5  # only a tail shorter than min_len is dropped
    lengths = np.array(lengths)
    assert len(set(lengths.tolist())) > 10  # the lengths vary
    # E[len] = 0.95 * 20 + 0.05 * 10 = 19.5 (the min clip and the tail barely move it)
    assert abs(lengths.mean() - 19.5) < 0.6
    narrow = BatchIterator(ids, 4, 20, "sequential", seed=1,
                           variable_length=VariableLength(p_full=0.95, std=1.0, min_len=5))
    short = [X.shape[1] <= 13 for e in range(5) for X, _ in narrow.epoch(e)]
    assert 0.03 < np.mean(short) < 0.08  # half-length windows with probability 0.05


def test_variable_length_is_seeded_resumable_and_sharded():
    ids = np.arange(6000, dtype=np.int64)
    it = BatchIterator(ids, 4, 12, "sequential", seed=3, variable_length=AWD)
    full = [X for X, _ in it.epoch(2)]
    again = [X for X, _ in BatchIterator(ids, 4, 12, "sequential", seed=3,
                                         variable_length=AWD).epoch(2)]
    assert all(torch_equal(a, b) for a, b in zip(full, again)) and len(full) == len(again)
    assert [X.shape for X in full] != [X.shape for X, _ in it.epoch(3)]
    rest = [X for X, _ in it.epoch(2, start_batch=4)]
    assert all(torch_equal(a, b) for a, b in zip(full[4:], rest)) and len(rest) == len(full) - 4
    parts = [list(BatchIterator(ids, 4, 12, "sequential", seed=3, rank=r, world_size=2,
                                variable_length=AWD).epoch(2)) for r in range(2)]
    for i, X in enumerate(full):
        assert (X == np.concatenate([parts[0][i][0], parts[1][i][0]])).all()


def test_variable_length_draw_is_awd_lstm():
    rng = np.random.default_rng(0)
    draws = np.array([VariableLength(p_full=1.0, std=0.0, min_len=1).draw(rng, 35)
                      for _ in range(50)])
    assert (draws == 35).all()
    draws = np.array([VariableLength(p_full=0.0, std=0.0, min_len=1).draw(rng, 35)
                      for _ in range(50)])
    assert (draws == 18).all()  # round(35 / 2)
    draws = np.array([VariableLength(p_full=1.0, std=30.0, min_len=7).draw(rng, 10)
                      for _ in range(500)])
    assert draws.min() == 7 and draws.max() > 40


def test_variable_length_needs_sequential_iteration():
    with pytest.raises(ValueError, match="sequential"):
        BatchIterator(np.arange(100), 2, 5, "random", seed=0, variable_length=AWD)


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())
