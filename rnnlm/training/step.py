"""Forward and backward of one batch, optionally split by lanes across CPU cores.

A character-level RNN step is a small matmul that two cores cannot share well (docs/benchmarks.md):
splitting every (32 x 512) @ (512 x 512) product over two threads gains little. Giving each
core its own group of lanes (rows of the batch) with one intra-op thread keeps both busy
on products that are each half as tall. The lanes of a batch are independent until the loss,
so with shards of equal size

    L = mean over all tokens = sum_k (n_k / n) * L_k,    dL/dw = sum_k (n_k / n) dL_k/dw

and the result is the single-threaded gradient up to floating-point rounding. Gradients of
the shards are summed in a fixed order, so runs stay deterministic.

What backward differentiates is the cross-entropy plus the run's regularizers (train.ar,
tar, rdrop: `Regularizers`), built by `batch_loss`, the one forward of a batch for both.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rnnlm.config.checks import model_class, resolve_precision, shards_allowed, uses_c_kernels
from rnnlm.models import LanguageModel, State


def sequence_loss(logits: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every predicted token; logits (T, B, V), Y (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.t().reshape(-1))


@dataclass(frozen=True)
class Regularizers:
    """What the training objective adds to the cross-entropy of one batch (train.ar, tar,
    rdrop; all 0, the default: nothing):

        ar * mean((m * h_t)^2) + tar * mean((h_t - h_(t-1))^2) + rdrop * KL_sym(p', p'')

    AR and TAR are AWD-LSTM's activation and temporal activation regularisation on the top
    layer's outputs, m * h_t after output dropout and h_t before it, means over every element
    (steps, lanes, units): AR keeps the activations small, TAR keeps them from jumping between
    steps. R-Drop runs every lane twice, each copy under its own dropout masks and carrying
    its own state, and penalises the symmetric KL divergence between the two copies'
    predicted distributions p' and p'' (mean over steps and lanes): the model learns to
    predict the same whatever dropout removed, which regularises more than dropout alone.
    The copies' cross-entropies are averaged into the loss the run reports. On the held-out
    recipes each lowers the validation perplexity (docs/speedrun.md)."""

    ar: float = 0.0
    tar: float = 0.0
    rdrop: float = 0.0

    @classmethod
    def from_config(cls, train) -> Regularizers:
        return cls(train.ar, train.tar, train.rdrop)

    def __bool__(self) -> bool:
        return bool(self.ar or self.tar or self.rdrop)

    @property
    def needs_activations(self) -> bool:
        return bool(self.ar or self.tar)

    def penalty(self, hidden: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """AR + TAR of one batch's top outputs hidden and dropped (T, B, H), in float32 at
        least (bf16 outputs are widened first)."""
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        hidden, dropped = hidden.to(dtype), dropped.to(dtype)
        penalty = hidden.new_zeros(())
        if self.ar:
            penalty = penalty + self.ar * dropped.pow(2).mean()
        if self.tar and hidden.shape[0] > 1:  # a one-step window has no change to penalise
            penalty = penalty + self.tar * (hidden[1:] - hidden[:-1]).pow(2).mean()
        return penalty

    @staticmethod
    def consistency(logits: torch.Tensor) -> torch.Tensor:
        """The symmetric KL divergence, (KL(p'||p'') + KL(p''||p')) / 2, between the two
        copies of every lane: logits (T, 2B, V) with the copies of lane i at 2i and 2i + 1."""
        logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
        first, second = logp[:, 0::2], logp[:, 1::2]
        difference = first - second
        return 0.5 * ((first.exp() - second.exp()) * difference).sum(-1).mean()


NO_REGULARIZERS = Regularizers()


def twice(X, Y, state: State) -> tuple[torch.Tensor, torch.Tensor, State]:
    """R-Drop's batch: every lane twice, side by side (lane i at 2i and 2i + 1, so that lane
    blocks split by rank or saved and resumed keep the pairs together). A fresh state (one
    copy per lane) is given to both copies; a carried one already holds both."""
    if state[0].shape[1] == X.shape[0]:
        state = tuple(s.repeat_interleave(2, dim=1) for s in state)
    return X.repeat_interleave(2, dim=0), Y.repeat_interleave(2, dim=0), state


def batch_loss(model: LanguageModel, X, Y, state: State, xi: torch.Tensor | None = None,
               regularizers: Regularizers = NO_REGULARIZERS
               ) -> tuple[torch.Tensor, torch.Tensor, State]:
    """The forward pass of one batch: (what backward differentiates, the cross-entropy that
    the run reports, the next state). The two losses are one tensor without regularizers."""
    options = {} if xi is None else {"xi": xi}
    if regularizers.rdrop:
        X, Y, state = twice(X, Y, state)
    if regularizers.needs_activations:
        logits, state, (hidden, dropped) = model(X, state, activations=True, **options)
    else:
        logits, state = model(X, state, **options)
    loss = sequence_loss(logits, Y)
    objective = loss
    if regularizers.needs_activations:
        objective = objective + regularizers.penalty(hidden, dropped)
    if regularizers.rdrop:
        objective = objective + regularizers.rdrop * regularizers.consistency(logits)
    return objective, loss, state


def autocast(device_type: str, precision: str):
    """The context a training forward pass runs in: bf16 autocast, or nothing for fp32."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def forward_backward(model: LanguageModel, X, Y, state: State,
                     xi: torch.Tensor | None = None, precision: str = "fp32",
                     regularizers: Regularizers = NO_REGULARIZERS) -> tuple[torch.Tensor, State]:
    """One batch on one thread: the cross-entropy (0-d, still attached) and the next state;
    grads in .grad, of the cross-entropy plus the `regularizers` (train.ar, tar, rdrop).
    xi: randomized truncation's multipliers (rnnlm.bptt.truncation), passed only when drawn.
    precision bf16 autocasts the forward pass; the backward follows the forward's dtypes
    (autocast is not meant to wrap it) and the carried state goes back to fp32."""
    dtype = state[0].dtype
    with autocast(X.device.type, precision):
        objective, loss, state = batch_loss(model, X, Y, state, xi, regularizers)
    objective.backward()
    return loss, tuple(s.to(dtype) for s in state)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_batch_shards(cfg, device: torch.device, distributed: bool) -> int:
    """train.batch_shards as a number. "auto" (the book presets) is 2 where sharding can
    run and was measured to pay: one CPU process (not under torchrun, which already gives
    each core a process) with two or more cores, and a config that a fixed 2 would pass
    (config.checks.validate: no dropout of any kind, as one random stream cannot be shared by
    the shard threads reproducibly, no torch.compile, two lanes or more), for every kind that
    declares supports.auto_shards, or supports.auto_shards_on_c_windows where its windows
    will run the C kernels (torch.nn's LSTM: its fused oneDNN kernel already keeps both
    cores busy, the C windows do not), in fp32: with bf16 products (train.precision: bf16,
    or auto on a CPU that multiplies bf16) MKL's bf16 GEMM on two threads over the whole
    batch measured 1.07-1.22x two shards of half the lanes for every book preset; else 1."""
    shards = cfg.train.batch_shards
    if shards != "auto":
        return shards
    supports = model_class(cfg).supports
    pays = (supports.auto_shards or (supports.auto_shards_on_c_windows
                                     and uses_c_kernels(cfg, device))) \
        and resolve_precision(cfg, device) == "fp32"
    possible = (device.type == "cpu" and not distributed and pays
                and usable_cores() >= 2 and shards_allowed(cfg, 2))
    return 2 if possible else 1


def shard_pool(num_shards: int, threads_per_shard: int | None = None) -> ThreadPoolExecutor:
    """Threads for the shards, each with `threads_per_shard` intra-op threads (default: the
    calling thread's count, 1 under train.batch_shards). Setting it inside every worker
    matters: torch.set_num_threads in the main thread does not reach OpenMP/MKL in threads
    started later, which otherwise use every core each (two shards then run four threads on
    two cores, and some products get several times slower)."""
    threads = threads_per_shard or torch.get_num_threads()
    return ThreadPoolExecutor(num_shards, thread_name_prefix="rnnlm-shard",
                              initializer=torch.set_num_threads, initargs=(threads,))


class ShardedForwardBackward:
    """Drop-in for `forward_backward` that runs `num_shards` lane groups on their own threads."""

    def __init__(self, num_shards: int, precision: str = "fp32",
                 regularizers: Regularizers = NO_REGULARIZERS):
        # R-Drop is refused with shards (it needs dropout, which shards refuse): the lane
        # blocks below would cut the state's pairs of copies
        self.num_shards, self.precision, self.regularizers = num_shards, precision, \
            regularizers
        self.pool = shard_pool(num_shards)

    def __call__(self, model: LanguageModel, X, Y, state: State, xi=None):
        params = [p for p in model.parameters() if p.requires_grad]
        lanes = torch.arange(X.shape[0]).tensor_split(self.num_shards)
        total = Y.numel()

        def shard(rows: torch.Tensor):
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            # xi is per step, shared by all lanes: every shard gets the same one. Autocast
            # is per thread, so each shard enters it itself. AR and TAR are means over
            # (steps, lanes, units) as the loss is over (steps, lanes): the same weights.
            with autocast(X.device.type, self.precision):
                objective, loss, new_state = batch_loss(
                    model, X[lo:hi], Y[lo:hi], tuple(s[:, lo:hi] for s in state), xi,
                    self.regularizers)
            weight = Y[lo:hi].numel() / total
            grads = torch.autograd.grad(objective * weight, params, allow_unused=True)
            return loss.detach() * weight, tuple(s.to(state[0].dtype) for s in new_state), grads

        results = list(self.pool.map(shard, lanes))
        for i, p in enumerate(params):
            parts = [r[2][i] for r in results if r[2][i] is not None]
            if parts:
                grad = parts[0].clone()
                for part in parts[1:]:
                    grad += part
                p.grad = grad if p.grad is None else p.grad + grad
        loss = sum(r[0] for r in results)
        state = tuple(torch.cat(parts, dim=1) for parts in zip(*(r[1] for r in results)))
        return loss, state

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def make_batch_step(cfg, precision: str, shards: int = 1):
    """The run's step for cfg: forward_backward in `precision` (train.precision resolved for
    the device) with cfg's regularizers, or with shards > 1 their ShardedForwardBackward
    (close it when done). What the training run and the speed measurements call."""
    regularizers = Regularizers.from_config(cfg.train)  # train.ar, tar, rdrop
    if shards > 1:
        return ShardedForwardBackward(shards, precision, regularizers)
    return functools.partial(forward_backward, precision=precision, regularizers=regularizers)
