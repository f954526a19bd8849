"""Divergence: a NaN or infinite loss, gradient norm or weight stops training at once.

Once a loss or a gradient is NaN or infinite, every later step spreads it through the weights:
training on would only fill metrics.jsonl with NaN and overwrite a good checkpoint with a
broken one. So `train_epoch` hands every batch's loss and gradient norm to a
`DivergenceWatch`, which raises `TrainingDiverged` naming the epoch, the batch and the last
finite loss; the run saves nothing after it (and checks the weights before every save), so the
checkpoints on disk are the last good ones. `rnnlm train` prints the error as one line and
exits with DIVERGED_EXIT_CODE.

Looking at a number on the GPU makes the host wait for the device. So on a GPU (and under
DDP, where a look is a collective) the watch copies each batch's two numbers into a small
device buffer and reads the buffer every CHECK_EVERY batches and at the end of the epoch: one
wait per CHECK_EVERY batches, and the run stops at most that many batches late, before
anything is saved. On a single CPU process reading a number costs nothing, so it looks after
every batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from rnnlm.training import distributed

DIVERGED_EXIT_CODE = 3  # not 0, 1 (a crash), 2 (a user error), 130/143 (stopped by a signal)
CHECK_EVERY = 32  # batches between two looks when a look costs a device sync or a collective
HINT = ("try a lower train.lr, or clip gradients with train.clip_norm "
        "(e.g. --set train.clip_norm=1.0, lower if it is set)")


class TrainingDiverged(Exception):
    """Training met a NaN or infinite number and stopped; nothing was saved after it.

    `epoch` and `batch` count from 1 (`batch` None: at the end of the epoch); `problem` says
    what was not finite; `last_loss` is the last finite batch loss of the epoch and
    `last_batch` its batch (None when no batch of this epoch had one)."""

    exit_code = DIVERGED_EXIT_CODE

    def __init__(self, epoch: int, batch: int | None, problem: str,
                 last_loss: float | None = None, last_batch: int | None = None):
        self.epoch, self.batch, self.problem = epoch, batch, problem
        self.last_loss, self.last_batch = last_loss, last_batch
        super().__init__(self.describe())

    def describe(self, kept: str = "nothing non-finite was saved") -> str:
        """The one line for the user; `kept` says which checkpoint survives."""
        where = f"at batch {self.batch}" if self.batch is not None else "at its end"
        last = f"last finite loss {self.last_loss:.4g} at batch {self.last_batch}" \
            if self.last_loss is not None else "no finite loss yet in this epoch"
        return (f"training diverged in epoch {self.epoch} {where}: {self.problem} ({last}); "
                f"{kept}; {HINT}")


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether no element of the floating-point `tensors` is NaN or infinite (one sync)."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


class DivergenceWatch:
    """Watches one epoch's batches (`epoch` and `first_batch` count from 0, as train_epoch's
    do) and raises TrainingDiverged at the first non-finite loss or gradient norm."""

    def __init__(self, device: torch.device, epoch: int, first_batch: int = 0,
                 every: int | None = None):
        in_step = device.type == "cpu" and not distributed.is_distributed()
        self.every = every or (1 if in_step else CHECK_EVERY)
        self.epoch, self.next_batch = epoch, first_batch  # the first batch not looked at
        self.last_loss: float | None = None
        self.last_batch: int | None = None
        self.count = 0  # batches waiting in the window
        self.window = None if self.every == 1 else \
            torch.zeros(self.every, 2, dtype=torch.float64, device=device)  # (loss, norm)

    def after_batch(self, loss: torch.Tensor, norm: torch.Tensor) -> None:
        """The batch's loss and pre-clip gradient norm (0-d tensors)."""
        if self.window is None:
            self.judge([(loss.item(), norm.item())])
            return
        self.window[self.count, 0] = loss.detach()  # copies on the device: no sync
        self.window[self.count, 1] = norm.detach()
        self.count += 1
        if self.count == self.every:
            self.look()

    def end_of_epoch(self, params: list[torch.Tensor]) -> None:
        """The batches not looked at yet, then the weights: the last step may have made them
        non-finite with a finite loss and gradient (an infinite learning rate does)."""
        self.look()
        if not all_finite(p.detach() for p in params):
            raise TrainingDiverged(self.epoch + 1, None, "the weights are not finite",
                                   self.last_loss, self.last_batch)

    def look(self) -> None:
        if not self.count:
            return
        values = self.window[:self.count]
        if distributed.is_distributed():  # the mean loss over the ranks: every rank decides alike
            ranks = distributed.context_from_env().world_size
            values = distributed.sum_across_ranks(values) / ranks
        self.count = 0
        self.judge(values.tolist())

    def judge(self, numbers: list) -> None:
        for loss, norm in numbers:
            self.next_batch += 1
            if not math.isfinite(loss):
                problem = f"the loss is {loss}"
            elif not math.isfinite(norm):
                problem = f"the gradient norm is {norm}"
            else:
                self.last_loss, self.last_batch = loss, self.next_batch
                continue
            raise TrainingDiverged(self.epoch + 1, self.next_batch, problem, self.last_loss,
                                   self.last_batch)


def check_weights_before_saving(modules: Iterable[torch.nn.Module | None], epoch: int,
                                batch: int | None) -> None:
    """Refuse to save non-finite weights (the model's, the weight average's): a checkpoint on
    disk is only ever replaced by a good one. `epoch` and `batch` count from 1."""
    tensors = [t for m in modules if m is not None for t in m.state_dict().values()]
    if not all_finite(tensors):
        raise TrainingDiverged(epoch, batch, "the weights to be saved are not finite")
