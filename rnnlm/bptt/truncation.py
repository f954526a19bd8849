"""Truncation strategies of BPTT (D2L 8.7.1; docs/bptt.md): what each training batch backpropagates.

* ``regular`` (D2L): every window of ``num_steps`` is backpropagated in full and the state is
  detached at the batch boundary.
* ``randomized`` (Tallec & Ollivier 2017): inside a window, step t's dh_t/dh_{t-1} is
  multiplied by xi_t, 0 with probability 1 - pi and 1/pi otherwise: the gradient stays
  unbiased but stops at random depths. Needs a step-by-step model.
* ``variable_length`` (AWD-LSTM): the sequential iterator draws each window's length
  (rnnlm.data.iterators.VariableLength) and the learning rate is scaled by length / num_steps for
  that step, so short windows do not weigh as much as long ones.

xi is drawn from a generator seeded by (seed, epoch, batch index): a run is deterministic, and
the xi of any batch can be drawn again later (the diagnostics draw the pattern actually used).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from rnnlm.bptt.rnn import sample_truncation_xi
from rnnlm.data.iterators import VariableLength

_XI_STREAM = 0x7872  # keeps xi's seeds apart from any other (seed, epoch) stream


def variable_length_of(train_cfg) -> VariableLength | None:
    """The iterator's window-length distribution, or None for fixed windows."""
    if train_cfg.truncation != "variable_length":
        return None
    return VariableLength(p_full=train_cfg.variable_length_p, std=train_cfg.variable_length_std,
                          min_len=train_cfg.variable_length_min)


def xi_seed(seed: int, epoch: int, batch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, batch, _XI_STREAM]).generate_state(1)[0])


class Truncation:
    """The per-batch decisions of one run's truncation strategy."""

    def __init__(self, kind: str, num_steps: int, seed: int, pi: float = 1.0):
        self.kind, self.num_steps, self.seed, self.pi = kind, num_steps, seed, pi

    @classmethod
    def from_config(cls, cfg) -> Truncation:
        return cls(cfg.train.truncation, cfg.data.num_steps, cfg.seed, cfg.train.truncation_pi)

    def xi(self, epoch: int, batch: int, length: int, device=None,
           dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """Randomized truncation's (length,) multipliers for one batch; None otherwise."""
        if self.kind != "randomized":
            return None
        gen = torch.Generator().manual_seed(xi_seed(self.seed, epoch, batch))
        return sample_truncation_xi(length, self.pi, gen, device=device, dtype=dtype)

    def lr_scale(self, length: int) -> float:
        """AWD-LSTM: a window of `length` steps takes a step of lr * length / num_steps."""
        return length / self.num_steps if self.kind == "variable_length" else 1.0

    @contextmanager
    def scaled_lr(self, optimizer: torch.optim.Optimizer, length: int):
        """Scale every param_group's lr for one optimizer step, then restore it exactly."""
        factor = self.lr_scale(length)
        if factor == 1.0:
            yield
            return
        saved = [group["lr"] for group in optimizer.param_groups]
        for group, lr in zip(optimizer.param_groups, saved):
            group["lr"] = lr * factor
        try:
            yield
        finally:
            for group, lr in zip(optimizer.param_groups, saved):
                group["lr"] = lr
