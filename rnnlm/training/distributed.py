"""Data-parallel training across processes started by torchrun (DistributedDataParallel).

torchrun starts one process per device and tells each who it is through environment
variables (RANK, WORLD_SIZE, LOCAL_RANK, and MASTER_ADDR/MASTER_PORT for the rendezvous).
A process without them, or with WORLD_SIZE=1, is a plain single-process run: every helper
here is then a no-op, so the trainer has one code path.

Why the result equals a single-process run: every rank takes `batch_size / world_size`
lanes (or windows) of the same global batch, its loss is the mean over its local tokens,
and DDP averages the gradients across ranks during backward. With the same number of
tokens on every rank (always true here), the average of the local means is the global
mean, so every rank holds the gradient the single process would have computed. Clipping
after backward therefore sees the same global norm on every rank, and the parameters
stay identical without any further communication.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rnnlm.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    """Who this process is among the job's processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # index of this process on its node: picks the GPU

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 prints, writes files and checkpoints; the others only compute."""
        return self.rank == 0


def is_main_process(environ=None) -> bool:
    """Whether this process is rank 0 (or alone), before any process group exists."""
    return context_from_env(environ).is_main


def _env_int(environ, name: str, default: int) -> int:
    text = environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} must be an integer "
                          f"(torchrun sets it; unset it for a single-process run)") from None


def context_from_env(environ=None) -> DistContext:
    environ = os.environ if environ is None else environ
    world_size = _env_int(environ, "WORLD_SIZE", 1)
    rank = _env_int(environ, "RANK", 0)
    local_rank = _env_int(environ, "LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} / WORLD_SIZE={world_size} are inconsistent: start "
                          f"data-parallel runs with torchrun, which sets them")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


def device_for_rank(device: torch.device, ctx: DistContext) -> torch.device:
    """One process per device: rank-local GPU LOCAL_RANK on CUDA, the CPU otherwise."""
    if not ctx.enabled:
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if ctx.local_rank >= count:
            raise ConfigError(f"LOCAL_RANK {ctx.local_rank} has no GPU: this node has {count}; "
                              f"start at most {count} processes per node "
                              f"(torchrun --nproc_per_node={count})")
        return torch.device("cuda", ctx.local_rank)
    if device.type != "cpu":
        raise ConfigError(f"device {device.type} does not support data-parallel training; "
                          f"use device: cpu (gloo) or cuda (NCCL) with torchrun")
    return device


@contextmanager
def process_group(ctx: DistContext, device: torch.device) -> Iterator[None]:
    """Join the job's process group for the duration of the block (NCCL on CUDA, gloo on
    CPU) and leave it however the block ends, so no rank hangs on exit."""
    if not ctx.enabled:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=ctx.rank, world_size=ctx.world_size,
                                device_id=device)
    else:
        dist.init_process_group("gloo", store=_attempt_store(), rank=ctx.rank,
                                world_size=ctx.world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _attempt_store():
    """torchrun's rendezvous store, its keys prefixed by the restart count: after
    `--max-restarts` restarted the workers, gloo would otherwise find the addresses the
    lost workers published in the same store and wait forever to connect to them."""
    store, _, _ = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"rnnlm/attempt_{attempt}/", store)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP around the model when running distributed, the model itself otherwise.

    Every parameter receives a gradient in every step (one-hot input gathers columns of the
    input weights, which still gives the whole matrix a gradient), so DDP needs no
    find_unused_parameters search. The carried state is detached at every batch boundary,
    so each backward pass stays within one forward call, as DDP expects.
    """
    if not is_distributed():
        return model
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP: the one whose begin_state, weights and state_dict we use."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def sum_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over all ranks (a copy; the input is left alone)."""
    values = values.clone()
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def max_across_ranks(value: float, device: torch.device) -> float:
    if not is_distributed():
        return value
    t = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def barrier() -> None:
    """Wait until every rank arrives (e.g. so rank 0's predictions between epochs are not
    counted in the other ranks' epoch time)."""
    if is_distributed():
        dist.barrier()


def seed_rank_streams(seed: int, ctx: DistContext) -> None:
    """Give each rank its own torch random stream once the model is built (identically on
    every rank), so dropout masks differ between ranks as they differ between the lanes of
    one process. Single-process runs keep their stream untouched."""
    if ctx.enabled:
        torch.manual_seed(int(np.random.SeedSequence([seed, ctx.rank]).generate_state(1)[0]))


# ---------------------------------------------------------------------------- carried state


def gather_lanes(state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The carried state of the whole global batch, (L, B_local, H) -> (L, B, H), on every
    rank; ranks hold consecutive lane blocks in rank order, as the iterator hands them out."""
    if not is_distributed():
        return state
    gathered = []
    for part in state:
        parts = [torch.empty_like(part) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, part.contiguous())
        gathered.append(torch.cat(parts, dim=1))
    return tuple(gathered)


def shard_lanes(state: tuple[torch.Tensor, ...], ctx: DistContext) -> tuple[torch.Tensor, ...]:
    """This rank's lanes of a global-batch state (the inverse of gather_lanes, for any
    world size that divides the batch)."""
    local = state[0].shape[1] // ctx.world_size
    return tuple(s[:, ctx.rank * local: (ctx.rank + 1) * local].contiguous() for s in state)


# ---------------------------------------------------------------------------- stopping

# torchrun forwards a Ctrl-C to its workers, which can then see it twice in quick succession;
# a repeat this soon is not the user's "second Ctrl-C, quit at once" (see interrupts.py).
SIGNAL_REPEAT_WINDOW_S = 0.5


def signal_repeat_window_s(environ=None) -> float:
    """How long a repeated signal counts as the same one: only under torchrun (which sets
    TORCHELASTIC_RUN_ID), where the launcher's forwarding can duplicate it."""
    environ = os.environ if environ is None else environ
    return SIGNAL_REPEAT_WINDOW_S if "TORCHELASTIC_RUN_ID" in environ else 0.0



class StopAgreement:
    """Lets all ranks stop after the same step when any of them was asked to (Ctrl-C or
    SIGTERM reach the ranks at slightly different moments, possibly in different steps).

    Each step starts an asynchronous MAX all-reduce of this rank's stop flag, which overlaps
    with the step's compute; `should_stop()` after the step waits for it, so every rank gets
    the same answer for the same step. Single-process runs just read the flag.
    """

    def __init__(self, requested):
        self.requested = requested  # () -> bool: this rank was asked to stop
        self._flag = None
        self._work = None

    def begin_step(self) -> None:
        if is_distributed():
            self._flag = torch.tensor([1 if self.requested() else 0], dtype=torch.int32)
            if dist.get_backend() == "nccl":
                self._flag = self._flag.cuda()
            self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, async_op=True)

    def should_stop(self) -> bool:
        if self._work is None:
            return bool(self.requested())
        self._work.wait()
        self._work = None
        return bool(self._flag.item())


# ---------------------------------------------------------------------------- test hook

KILL_ENV = "RNNLM_TEST_KILL"


class FaultInjector:
    """For the lost-worker test only: RNNLM_TEST_KILL="RANK:STEP:MARKER" makes rank RANK
    die abruptly (os._exit, no cleanup) at its STEP-th training step of this process, once:
    the MARKER file it creates first keeps the restarted process alive."""

    def __init__(self, ctx: DistContext, environ=None):
        spec = (os.environ if environ is None else environ).get(KILL_ENV)
        self.step_to_die = None
        self.steps = 0
        if spec:
            rank, step, marker = spec.split(":", 2)
            if int(rank) == ctx.rank and not os.path.exists(marker):
                self.step_to_die, self.marker = int(step), marker

    def wrap(self, step):
        """`step` (a trainer batch step) that first counts itself here, when armed."""
        if self.step_to_die is None:
            return step

        def counted_step(*args, **kwargs):
            self.step()
            return step(*args, **kwargs)
        return counted_step

    def step(self) -> None:
        self.steps += 1
        if self.steps == self.step_to_die:
            with open(self.marker, "w", encoding="utf-8") as f:
                f.write(f"killed at step {self.steps}\n")
            os._exit(17)
