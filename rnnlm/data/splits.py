"""Contiguous train / validation / test splits of a token stream.

`data.split: [train, val, test]` cuts the stream (after `data.max_tokens`) into three
consecutive pieces: training is the head, validation follows, test is the tail. Validation
and test get floor(fraction x tokens) each, training the rest, so the pieces cover the stream
exactly, without overlap. Held-out text is therefore text the model never saw, not
interleaved windows of the training lanes.

Evaluation (`rnnlm.evaluation.evaluate`) reads each held-out piece on its own, in `data.eval_lanes`
contiguous lanes; the first token of every lane is context only (nothing precedes it), so a
piece of m tokens read in k lanes scores m - k predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rnnlm.data.sources import DataError

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Splits:
    train: np.ndarray
    val: np.ndarray | None = None  # None: no validation split
    test: np.ndarray | None = None  # None: no test split

    def heldout(self) -> dict[str, np.ndarray]:
        return {name: part for name, part in (("val", self.val), ("test", self.test))
                if part is not None}


def split_sizes(n: int, fractions: list[float]) -> tuple[int, int, int]:
    n_val = int(n * fractions[1])
    n_test = int(n * fractions[2])
    return n - n_val - n_test, n_val, n_test


def split_ids(ids: np.ndarray, fractions: list[float] | None) -> Splits:
    """Views of `ids` (no copy: a memmap stays a memmap)."""
    if fractions is None:
        return Splits(train=ids)
    n_train, n_val, n_test = split_sizes(len(ids), fractions)
    val = ids[n_train: n_train + n_val] if fractions[1] > 0 else None
    test = ids[n_train + n_val:] if fractions[2] > 0 else None
    return Splits(train=ids[:n_train], val=val, test=test)


def check_heldout_lengths(splits: Splits, eval_lanes: int, source: str) -> None:
    """Each lane needs two tokens: one of context and one to predict."""
    need = 2 * eval_lanes
    for name, part in splits.heldout().items():
        if len(part) < need:
            label = "validation" if name == "val" else "test"
            raise DataError(f"the {label} split of {source} has {len(part)} tokens, but "
                              f"data.eval_lanes={eval_lanes} needs at least {need}: use a "
                              f"larger data.split fraction, more data.max_tokens, or fewer "
                              f"data.eval_lanes")
