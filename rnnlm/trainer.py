"""The training loop: D2L's train_epoch_ch8 semantics, metrics, predictions.

Step order, always: zero_grad -> forward -> loss -> backward -> clip (norm recorded) -> step.
Per-batch numbers stay on the device as tensors and are read once per epoch, so no host
sync happens inside the loop.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rnnlm import distributed
from rnnlm.averaging import WeightAverage
from rnnlm.config import Config, ConfigError, dump_yaml
from rnnlm.data import PREPROCESSORS, Corpus, load_corpus
from rnnlm.evaluate import BestWeights, evaluate
from rnnlm.iterators import BatchIterator
from rnnlm.models import LanguageModel, build_model, detach_state
from rnnlm.plots import plot_perplexity
from rnnlm.sampling import predict_greedy
from rnnlm.schedules import EarlyStopping, LRSchedule
from rnnlm.shards import ShardedForwardBackward, forward_backward


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but CUDA is not available here; "
                          "use device: cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None)
                              and torch.backends.mps.is_available()):
        raise ConfigError("device: mps was asked for but MPS is not available here; "
                          "use device: cpu or auto")
    return torch.device(name)


def set_threads(cfg: Config) -> None:
    """train.threads when given; else one intra-op thread per batch shard when sharding (each
    core runs its own lanes), and torch's default otherwise."""
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    elif cfg.train.batch_shards > 1:
        torch.set_num_threads(1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(cfg: Config, model: LanguageModel) -> torch.optim.Optimizer:
    t = cfg.train
    params = model.parameters()
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


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


@dataclass
class EpochResult:
    loss: float  # mean cross-entropy per predicted token (nats)
    tokens: int
    seconds: float
    grad_norm: float  # mean pre-clip global norm over the epoch's batches
    clipped_frac: float  # fraction of batches whose gradient was scaled down
    batches: int

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
                step=forward_backward,
                on_step: Callable[[], None] | None = None) -> EpochResult:
    """One pass over the data, D2L's train_epoch_ch8.

    carry_state=True (sequential iteration): the state is created at the first batch,
    carried across batches and detached at every boundary (regular truncated BPTT).
    carry_state=False (random iteration): a fresh state for every batch.
    `step` computes the loss and the gradients of one batch (shards.py).
    Under DDP `model` is the wrapped model and `batches` this rank's share; the returned
    loss, tokens and time are totals over all ranks (the same on every rank).
    on_step, when given, runs after every optimizer step (e.g. to update a weight average).
    """
    model.train()
    core = distributed.unwrap(model)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    norm_sum = torch.zeros((), device=device, dtype=torch.float64)
    clipped = torch.zeros((), device=device, dtype=torch.float64)
    tokens = num_batches = 0
    state = None
    distributed.barrier()
    synchronize(device)
    start = time.perf_counter()
    for X, Y in batches:
        X, Y = X.to(device, non_blocking=True), Y.to(device, non_blocking=True)
        if state is None or not carry_state:
            state = core.begin_state(X.shape[0])  # local lanes
        else:
            state = detach_state(state)
        optimizer.zero_grad(set_to_none=True)
        loss, state = step(model, X, Y, state)
        norm = clip_gradients(params, clip_norm)
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
    synchronize(device)
    seconds = distributed.max_across_ranks(time.perf_counter() - start, device)
    if num_batches == 0:
        raise RuntimeError("the iterator yielded no batch")  # prevented by check_corpus_length
    # The gradient norm and clipping need no reduction: DDP averaged the gradients, so
    # every rank clipped the same global gradient. Loss and tokens are per-rank sums.
    loss_total, tokens = distributed.sum_across_ranks(
        torch.stack([loss_sum, loss_sum.new_tensor(tokens)])).tolist()
    tokens = int(tokens)
    return EpochResult(loss=loss_total / tokens, tokens=tokens, seconds=seconds,
                       grad_norm=norm_sum.item() / num_batches,
                       clipped_frac=clipped.item() / num_batches, batches=num_batches)


def prefix_ids(corpus: Corpus, prefix: str) -> list[int]:
    """The prefix through the corpus' own preprocessing; unknown characters map to <unk>."""
    text = PREPROCESSORS[corpus.preprocess](prefix)
    if not text:
        raise ConfigError(f"train.prefix {prefix!r} is empty after {corpus.preprocess} "
                          f"preprocessing: give at least one character of the text")
    return corpus.vocab.encode(text, unknown="replace").tolist()


class MetricsLog:
    """metrics.jsonl: one JSON object per epoch (public interface: keep key names stable)."""

    def __init__(self, path: Path, append: bool = False):
        self.path = path
        if not append:
            path.write_text("")

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def train(cfg: Config, quiet: bool = False, out=sys.stdout) -> dict:
    """Run a whole training job from a config; returns the last epoch's record (with the
    best validation and the test metrics when the data is split).

    Under torchrun this process is one rank of a data-parallel job (rnnlm.distributed);
    alone it is the whole job."""
    ctx = distributed.context_from_env()
    distributed.check_config(cfg, ctx)
    device = distributed.device_for_rank(resolve_device(cfg.device), ctx)
    with distributed.process_group(ctx, device):
        return run_training(cfg, ctx, device, quiet or not ctx.is_main, out)


def run_training(cfg: Config, ctx: distributed.DistContext, device: torch.device,
                 quiet: bool, out) -> dict:
    batch_step = forward_backward
    if cfg.train.batch_shards > 1:
        if device.type != "cpu":
            raise ConfigError(f"train.batch_shards: {cfg.train.batch_shards} splits batches "
                              f"across CPU cores; on {device.type} use 1")
        batch_step = ShardedForwardBackward(cfg.train.batch_shards)
    set_threads(cfg)
    seed_everything(cfg.seed)
    corpus = load_corpus(cfg.data)
    splits = corpus.splits
    batches = BatchIterator(splits.train, cfg.data.batch_size, cfg.data.num_steps,
                            cfg.data.iterator, seed=cfg.seed, rank=ctx.rank,
                            world_size=ctx.world_size)
    model = build_model(cfg.model, len(corpus.vocab)).to(device)
    distributed.seed_rank_streams(cfg.seed, ctx)
    optimizer = make_optimizer(cfg, model)
    schedule = LRSchedule(cfg.train, optimizer)
    stopper = EarlyStopping(cfg.train.early_stop_patience)
    average = WeightAverage(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    scored = average.model if average is not None else model  # what evaluation scores
    best = BestWeights()
    prompt = prefix_ids(corpus, cfg.train.prefix)
    train_model = model
    if device.type == "cuda" and cfg.train.cuda_graphs:
        from rnnlm.cuda_graphs import GraphedModel
        train_model = GraphedModel(model, batches.local_batch, cfg.data.num_steps)
    train_model = distributed.wrap_model(train_model, device)  # DDP when distributed

    out_dir = Path(cfg.out_dir)
    metrics = None  # only rank 0 writes files
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
        metrics = MetricsLog(out_dir / "metrics.jsonl")
    plot_path, plot_title = out_dir / "perplexity.png", f"{cfg.model.kind} ({out_dir.name})"

    def say(line: str) -> None:
        if not quiet:
            tqdm.write(line, file=out)

    n_params = sum(p.numel() for p in model.parameters())
    say(f"{cfg.model.kind}: {n_params:,} parameters, vocabulary {len(corpus.vocab)}, "
        f"{len(corpus):,} tokens from {corpus.source} ({corpus.preprocess}"
        f"{', cached' if corpus.from_cache else ''}), "
        f"{cfg.data.iterator} iteration, device {device}"
        + (f", {ctx.world_size} processes (DDP)" if ctx.enabled else ""))
    if cfg.data.split is not None:
        parts = {"train": splits.train, **splits.heldout()}
        say("split: " + ", ".join(f"{name} {len(ids):,}" for name, ids in parts.items()))

    show_bar = not quiet and out.isatty()
    bar = tqdm(range(cfg.train.epochs), disable=not show_bar, unit="epoch", file=out,
               dynamic_ncols=True)
    wall_start = time.perf_counter()
    step = 0
    record: dict = {}
    records: list[dict] = []
    on_step = (lambda: average.update(model)) if average is not None else None
    for epoch in bar:
        result = train_epoch(train_model, batches.epoch(epoch), optimizer, cfg.train.clip_norm,
                             batches.carries_state, device, batch_step, on_step=on_step)
        step += result.batches
        record = {
            "epoch": epoch + 1, "step": step,
            "train_loss": result.loss, "train_ppl": result.ppl,
            "train_bpc": result.loss / math.log(2),
            "tokens_per_s": result.tokens_per_s, "grad_norm": result.grad_norm,
            "clipped_frac": result.clipped_frac, "lr": optimizer.param_groups[0]["lr"],
            "epoch_s": result.seconds, "tokens": result.tokens,
        }
        every, last = cfg.train.eval_every, epoch + 1 == cfg.train.epochs
        evaluating = last or (every > 0 and (epoch + 1) % every == 0)
        stop = False
        if evaluating and splits.val is not None:
            # Every rank evaluates the same weights on the whole split, so every rank takes
            # the same best-weights, schedule and stopping decisions without talking.
            val = evaluate(scored, splits.val, cfg.data.eval_lanes, device)
            record.update(val.as_record("val"))
            best.offer(val.ppl, epoch + 1, scored)
            stop = stopper.should_stop(val.ppl)
            say(f"epoch {epoch + 1:>4}  train ppl {result.ppl:8.3f}  val ppl {val.ppl:8.3f}  "
                f"val bpc {val.bpc:6.3f}  lr {record['lr']:.3g}")
        schedule.after_epoch(record.get("val_ppl"))
        record["wall_s"] = time.perf_counter() - wall_start
        records.append(record)
        every = cfg.train.predict_every
        progress = every and (epoch + 1) % every == 0 and epoch + 1 < cfg.train.epochs
        if metrics is not None:
            metrics.write(record)
            # The plot follows the validation passes; without validation, the progress lines
            # (a redraw every epoch would cost a book run more than its training).
            if "val_ppl" in record or (splits.val is None and progress):
                plot_perplexity(records, plot_path, plot_title)
        bar.set_postfix(ppl=f"{result.ppl:.2f}", tok_s=f"{result.tokens_per_s:,.0f}")
        if progress and not quiet:
            say(f"epoch {epoch + 1:>4}  ppl {result.ppl:8.3f}  grad {result.grad_norm:6.3f}  "
                f"{result.tokens_per_s:>9,.0f} tok/s  | "
                f"{predict_greedy(model, corpus.vocab, prompt, cfg.train.predict_chars)}")
        if stop:
            say(f"early stop after epoch {epoch + 1}: validation perplexity has not improved "
                f"for {stopper.bad_evaluations} evaluations (best {best.ppl:.3f} at epoch "
                f"{best.epoch})")
            break
    bar.close()
    if isinstance(batch_step, ShardedForwardBackward):
        batch_step.close()
    if not ctx.is_main:
        return record
    plot_perplexity(records, plot_path, plot_title)

    final_text = predict_greedy(model, corpus.vocab, prompt, cfg.train.predict_chars)
    if splits.val is not None:
        say(f"best validation perplexity {best.ppl:.3f} (bpc {math.log2(best.ppl):.3f}) at "
            f"epoch {best.epoch}")
        record["best_val_ppl"], record["best_epoch"] = best.ppl, best.epoch
    if splits.test is not None:
        record.update(score_test_split(scored, best, splits.test, cfg, device, metrics, say))
    print(final_text, file=out)
    print(f"perplexity {record['train_ppl']:.1f}, {record['tokens_per_s']:.1f} tokens/sec "
          f"on {device}", file=out)
    record["prediction"] = final_text
    return record


def score_test_split(scored: LanguageModel, best: BestWeights, test_ids, cfg: Config,
                      device: torch.device, metrics: MetricsLog, say) -> dict:
    """Evaluate the test split once, on the weights with the best validation perplexity
    (the final weights when there is no validation split), and log one `test` record."""
    if best.state is not None:
        scored.load_state_dict(best.state)
    result = evaluate(scored, test_ids, cfg.data.eval_lanes, device)
    weights = f"epoch {best.epoch}" if best.epoch is not None else "final"
    say(f"test perplexity {result.ppl:.3f} (bpc {result.bpc:.3f}) with the {weights} weights")
    record = {"event": "test", "weights_epoch": best.epoch, **result.as_record("test")}
    metrics.write(record)
    return {k: v for k, v in record.items() if k.startswith("test_")}
