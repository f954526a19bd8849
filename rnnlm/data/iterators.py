"""Minibatch iteration over a token stream with D2L's exact semantics.

* sequential (`seq_data_iter_sequential`): a random offset in [0, num_steps], the stream cut
  into `batch_size` contiguous lanes; batch i of a lane continues batch i-1, so the hidden
  state may be carried from one batch to the next.
* random (`seq_data_iter_random`): a random offset in [0, num_steps - 1], the stream cut into
  non-overlapping windows which are shuffled; consecutive batches are unrelated.

With a ``VariableLength`` (AWD-LSTM's variable BPTT, train.truncation=variable_length), the
sequential iterator draws each batch's window length instead of using num_steps: the lanes
stay contiguous, only the cuts between batches move.

Randomness comes from a NumPy generator seeded by (seed, epoch), so an epoch can be replayed
or resumed from any batch without storing generator state. For data-parallel training each
rank takes its own share of every batch (`rank`, `world_size`): lanes for sequential, windows
for random, so the global batch is exactly the single-process one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class VariableLength:
    """AWD-LSTM's window length: base num_steps with probability p_full, else num_steps / 2;
    then round(N(base, std)), at least min_len and at most what is left of the lanes."""

    p_full: float = 0.95
    std: float = 5.0
    min_len: int = 5

    def draw(self, rng: np.random.Generator, num_steps: int) -> int:
        base = num_steps if rng.random() < self.p_full else num_steps / 2
        return max(self.min_len, int(round(rng.normal(base, self.std))))


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def _to_long(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))


class BatchIterator:
    """Yields (X, Y) pairs of shape (batch_size // world_size, num_steps), Y = X shifted by one."""

    def __init__(self, ids: np.ndarray, batch_size: int, num_steps: int, mode: str,
                 seed: int, rank: int = 0, world_size: int = 1,
                 variable_length: VariableLength | None = None):
        if mode not in ("sequential", "random"):
            raise ValueError(f"unknown iterator {mode!r}")
        if variable_length is not None and mode != "sequential":
            raise ValueError("variable-length windows need sequential iteration")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by {world_size} ranks")
        self.ids, self.batch_size, self.num_steps = ids, batch_size, num_steps
        self.mode, self.seed = mode, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch = batch_size // world_size
        self.variable_length = variable_length

    @property
    def carries_state(self) -> bool:
        """Whether batch i continues batch i-1 lane by lane (so state may be carried)."""
        return self.mode == "sequential"

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor,
                                                                     torch.Tensor]]:
        rng = epoch_rng(self.seed, epoch)
        if self.mode == "sequential":
            yield from self._sequential(rng, start_batch)
        else:
            yield from self._random(rng, start_batch)

    def num_batches(self, epoch: int) -> int:
        return sum(1 for _ in self.epoch(epoch))

    def _lanes(self) -> slice:
        return slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)

    def _sequential(self, rng, start_batch):
        B, T = self.batch_size, self.num_steps
        offset = int(rng.integers(0, T + 1))  # D2L: random.randint(0, num_steps)
        num_tokens = ((len(self.ids) - offset - 1) // B) * B
        xs = self.ids[offset: offset + num_tokens].reshape(B, -1)[self._lanes()]
        ys = self.ids[offset + 1: offset + 1 + num_tokens].reshape(B, -1)[self._lanes()]
        if self.variable_length is not None:
            for i, j in self._variable_windows(rng, xs.shape[1])[start_batch:]:
                yield _to_long(xs[:, i:j]), _to_long(ys[:, i:j])
            return
        num_batches = xs.shape[1] // T
        for i in range(start_batch * T, num_batches * T, T):
            yield _to_long(xs[:, i: i + T]), _to_long(ys[:, i: i + T])

    def _variable_windows(self, rng, lane_len: int) -> list[tuple[int, int]]:
        """[start, end) of each window along the lanes. All lengths are drawn before the first
        batch, from the epoch's generator after the offset, so resuming at start_batch replays
        the same cuts. A tail shorter than min_len is dropped, as the fixed iterator drops a
        tail shorter than num_steps."""
        spans, i = [], 0
        while lane_len - i >= self.variable_length.min_len:
            j = i + min(self.variable_length.draw(rng, self.num_steps), lane_len - i)
            spans.append((i, j))
            i = j
        return spans

    def _random(self, rng, start_batch):
        B, T = self.batch_size, self.num_steps
        offset = int(rng.integers(0, T))  # D2L: random.randint(0, num_steps - 1)
        num_windows = (len(self.ids) - offset - 1) // T
        starts = offset + np.arange(0, num_windows * T, T)
        starts = starts[rng.permutation(num_windows)]
        num_batches = num_windows // B
        steps = np.arange(T)
        for b in range(start_batch, num_batches):
            mine = starts[b * B: (b + 1) * B][self._lanes()]
            index = mine[:, None] + steps  # (local_batch, T)
            yield _to_long(self.ids[index]), _to_long(self.ids[index + 1])
