"""One pass over the training data: D2L's train_epoch_ch8.

Step order, always: zero_grad -> forward -> loss -> backward -> clip (norm recorded) -> step.
Per-batch numbers stay on the device as tensors and are read once per epoch, so no host
sync happens inside the loop; the divergence watch (rnnlm.training.divergence) reads its copy
of the loss and gradient norm every few batches on a GPU, after every batch on a CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rnnlm.bptt.truncation import Truncation
from rnnlm.models import LanguageModel, detach_state
from rnnlm.training import distributed
from rnnlm.training.divergence import DivergenceWatch
from rnnlm.training.step import forward_backward


def clip_gradients(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """D2L's grad_clipping (scale by max_norm / norm when norm > max_norm) without a host
    sync: the factor min(1, max_norm / norm) is applied always; x * 1.0 == x exactly.
    Returns the pre-clip global L2 norm as a 0-d tensor."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if max_norm is not None:
        torch._foreach_mul_(grads, (max_norm / norm).clamp(max=1.0))
    return norm


def perplexity(mean_loss: float) -> float:
    return math.exp(min(mean_loss, 700.0))  # exp overflows past ~709


PPL_CAP = perplexity(700.0)  # what perplexity returns for every loss from 700 on
LARGE_PPL = 1e6  # from here on a perplexity prints in powers of ten


def format_ppl(ppl: float, decimals: int = 3) -> str:
    """A perplexity for the progress and summary lines: with `decimals` decimals, as every
    healthy run prints it, but compact when it is huge (a diverging run's 1.2e+08), and
    '>1e+304' at perplexity's cap, where the true value is beyond a float."""
    if ppl >= PPL_CAP:
        return ">1e+304"
    return f"{ppl:.3g}" if ppl >= LARGE_PPL else f"{ppl:.{decimals}f}"


@dataclass
class EpochProgress:
    """An epoch's running totals after `batches` batches: what a checkpoint taken in the
    middle of an epoch needs to finish it exactly as an uninterrupted run would.

    Totals are over all ranks, and `state` holds every lane of the global batch; under DDP
    rank 0 resumes with the loss and token totals and the other ranks with zero, since
    train_epoch sums them over the ranks at the end."""
    batches: int = 0
    tokens: int = 0
    seconds: float = 0.0
    loss_sum: float = 0.0  # float64 sums as Python floats: they round-trip exactly
    norm_sum: float = 0.0
    clipped: float = 0.0
    state: tuple | None = None  # the hidden state carried into the next batch (sequential)

    def to_dict(self) -> dict:
        fields = dict(vars(self))
        fields["state"] = None if self.state is None else [s.detach() for s in self.state]
        return fields

    @classmethod
    def from_dict(cls, fields: dict, device: torch.device,
                  ctx: distributed.DistContext) -> EpochProgress:
        progress = cls(**fields)
        if progress.state is not None:
            state = tuple(s.to(device) for s in progress.state)
            progress.state = distributed.shard_lanes(state, ctx) if ctx.enabled else state
        if not ctx.is_main:
            progress.loss_sum, progress.tokens = 0.0, 0
        return progress


@dataclass
class EpochResult:
    loss: float  # mean cross-entropy per predicted token (nats)
    tokens: int
    seconds: float
    grad_norm: float  # mean pre-clip global norm over the epoch's batches
    clipped_frac: float  # fraction of batches whose gradient was scaled down
    batches: int
    progress: EpochProgress | None = None  # the totals behind these numbers
    complete: bool = True  # False when a stop request ended the epoch early

    @property
    def ppl(self) -> float:
        return perplexity(self.loss)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(model: LanguageModel, batches, optimizer, clip_norm: float | None,
                carry_state: bool, device: torch.device,
                step=forward_backward, start: EpochProgress | None = None,
                stop: distributed.StopAgreement | None = None,
                truncation: Truncation | None = None, epoch: int = 0,
                on_step: Callable[[], None] | None = None) -> EpochResult:
    """One pass over the data, D2L's train_epoch_ch8; returns the epoch's mean loss,
    gradient norm, clipping fraction, tokens and time.

    The textbook's arguments: `model`, `batches` (the epoch's (X, Y) pairs), `optimizer`,
    `clip_norm` (None: no clipping) and `carry_state`: True for sequential iteration (the
    state is created at the first batch, carried across batches and detached at every
    boundary: regular truncated BPTT), False for random iteration (a fresh state for every
    batch). `step` computes the loss and the gradients of one batch (rnnlm.training.step).

    What the engine adds, each None or off by default:
    `truncation` (rnnlm.bptt.truncation): randomized xi per batch, or the learning rate
    scaled by the window length (variable_length); None is regular truncation. xi is seeded
    by (seed, epoch, batch index), so every rank and a resumed epoch draw the same.
    `start` continues an epoch that a checkpoint stopped part way (`batches` must then begin
    at batch `start.batches`). When `stop` says so after a batch (on every rank at the same
    batch), the epoch ends early with complete=False.
    `on_step` runs after every optimizer step (e.g. to update a weight average).
    A NaN or infinite loss, gradient norm or weight raises TrainingDiverged
    (rnnlm.training.divergence) at once on a CPU, within a few batches on a GPU.
    Under DDP `model` is the wrapped model and `batches` this rank's share; the returned
    loss, tokens and time are totals over all ranks (the same on every rank).
    """
    model.train()
    core = distributed.unwrap(model)
    params = [p for p in model.parameters() if p.requires_grad]
    start = start or EpochProgress()
    loss_sum = torch.tensor(start.loss_sum, device=device, dtype=torch.float64)
    norm_sum = torch.tensor(start.norm_sum, device=device, dtype=torch.float64)
    clipped = torch.tensor(start.clipped, device=device, dtype=torch.float64)
    tokens, num_batches, state = start.tokens, start.batches, start.state
    stopped = False
    distributed.barrier()
    synchronize(device)
    begin = time.perf_counter()
    truncation = truncation or Truncation("regular", 1, 0)
    dtype = params[0].dtype
    watch = DivergenceWatch(device, epoch, start.batches)
    for b, (X, Y) in enumerate(batches, start=start.batches):
        if stop is not None:
            stop.begin_step()  # overlaps the ranks' agreement with this batch's compute
        X, Y = X.to(device, non_blocking=True), Y.to(device, non_blocking=True)
        if state is None or not carry_state:
            state = core.begin_state(X.shape[0])  # local lanes
        else:
            state = detach_state(state)
        xi = truncation.xi(epoch, b, X.shape[1], device, dtype)
        optimizer.zero_grad(set_to_none=True)
        loss, state = step(model, X, Y, state, xi)
        norm = clip_gradients(params, clip_norm)
        with truncation.scaled_lr(optimizer, X.shape[1]):
            optimizer.step()
            if on_step is not None:
                on_step()
        n = Y.numel()
        loss_sum += loss.detach() * n
        norm_sum += norm.detach()
        if clip_norm is not None:
            clipped += (norm > clip_norm).to(clipped.dtype)
        tokens += n
        num_batches += 1
        watch.after_batch(loss, norm)  # stop at a NaN or infinite loss or gradient norm
        if stop is not None and stop.should_stop():
            stopped = True
            break
    watch.end_of_epoch(params)  # the batches not looked at yet, and the weights
    synchronize(device)
    seconds = start.seconds + distributed.max_across_ranks(time.perf_counter() - begin, device)
    if num_batches == 0:
        raise RuntimeError("the iterator yielded no batch")  # prevented by check_corpus_length
    # The gradient norm and clipping need no reduction: DDP averaged the gradients, so
    # every rank clipped the same global gradient. Loss and tokens are per-rank sums.
    loss_total, tokens = distributed.sum_across_ranks(
        torch.stack([loss_sum, loss_sum.new_tensor(tokens)])).tolist()
    tokens = int(tokens)
    progress = EpochProgress(num_batches, tokens, seconds, loss_total, norm_sum.item(),
                             clipped.item(), state if carry_state else None)
    return EpochResult(loss=loss_total / tokens, tokens=tokens, seconds=seconds,
                       grad_norm=progress.norm_sum / num_batches,
                       clipped_frac=progress.clipped / num_batches, batches=num_batches,
                       progress=progress, complete=not stopped)
