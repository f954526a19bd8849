"""A whole training run around train_epoch: set up, resume, epochs, evaluation, the best
weights, checkpoints, predictions and the test split."""

from __future__ import annotations

import functools
import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rnnlm.bptt.truncation import Truncation, variable_length_of
from rnnlm.checkpoint import (
    atomic_save,
    claim_out_dir,
    improves,
    make_checkpoint,
    restore_rng,
    restore_training,
    tracked_metric,
)
from rnnlm.config import Config, ConfigError, cell_kernel_applies, dump_yaml
from rnnlm.data.corpus import PREPROCESSORS, Corpus, load_corpus
from rnnlm.data.iterators import BatchIterator
from rnnlm.diagnostics.report import DiagnosticsRecorder
from rnnlm.evaluation.evaluate import BestWeights, evaluate
from rnnlm.evaluation.sampling import predict_greedy
from rnnlm.kernels import native
from rnnlm.models import LanguageModel, build_model
from rnnlm.training import distributed
from rnnlm.training.averaging import WeightAverage
from rnnlm.training.epoch import EpochProgress, train_epoch
from rnnlm.training.interrupts import StopRequest, TrainingInterrupted, stop_on_signals
from rnnlm.training.schedules import EarlyStopping, LRSchedule
from rnnlm.training.step import ShardedForwardBackward, forward_backward, resolve_batch_shards


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


@contextmanager
def run_threads(threads: int | None, shards: int):
    """train.threads when given; else one intra-op thread per batch shard when sharding (each
    core runs its own lanes), and torch's default otherwise. The caller's count comes back
    afterwards: bench.py and tests run several trainings in one process, and one run's
    setting must not slow the next."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    elif shards > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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

    def keep_epochs(self, last_epoch: int) -> None:
        """Drop records after `last_epoch` (epochs a resumed run is about to redo, written
        after the checkpoint it resumes from), so every epoch appears once."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["epoch"] <= last_epoch:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a killed process
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def train(cfg: Config, quiet: bool = False, out=sys.stdout, resume: dict | None = None,
          resume_path: str | Path | None = None, overwrite: bool = False,
          stop: StopRequest | None = None) -> dict:
    """Run a whole training job from a config; returns the last epoch's record (with the
    best validation and the test metrics when the data is split).

    `resume` (a loaded checkpoint, read from `resume_path`) continues that run exactly where
    it stopped. A new run refuses an out_dir that holds a checkpoint unless `overwrite`.
    SIGINT/SIGTERM stop the run after the current batch, write last.pt and raise
    TrainingInterrupted; pass `stop` to control stopping yourself (no handlers installed).

    Under torchrun this process is one rank of a data-parallel job (rnnlm.training.distributed);
    alone it is the whole job."""
    ctx = distributed.context_from_env()
    distributed.check_config(cfg, ctx)
    device = distributed.device_for_rank(resolve_device(cfg.device), ctx)
    own_stop = stop is None
    stop = StopRequest() if own_stop else stop
    shards = resolve_batch_shards(cfg, device, ctx.enabled)
    with distributed.process_group(ctx, device), run_threads(cfg.train.threads, shards), \
            (stop_on_signals(stop, distributed.signal_repeat_window_s())
             if own_stop else nullcontext(stop)):
        return run_training(cfg, ctx, device, quiet or not ctx.is_main, out, resume,
                            resume_path, overwrite, stop, shards)


def plot_perplexity(records: list[dict], path: Path, title: str) -> None:
    """plots.plot_perplexity, imported at the first drawing: matplotlib takes about 0.5 s to
    import, which sample.py (it imports this module) and every config error would pay."""
    from rnnlm.training import plots

    plots.plot_perplexity(records, path, title)


def check_cell_kernel(cfg: Config, device: torch.device) -> None:
    """model.cell_kernel=c must be able to run here; auto falls back to tensor ops (said once
    where it would have used the C kernels)."""
    kernel = cfg.model.cell_kernel
    if kernel == "torch" or not cell_kernel_applies(cfg):
        return
    if kernel == "c" and device.type != "cpu":
        raise ConfigError(f"model.cell_kernel: c runs on the CPU, this run is on {device.type}: "
                          "use model.cell_kernel=auto")
    # the scratch RNN has only the whole-window C loop
    reason = native.unavailable_reason(whole_windows=cfg.model.kind == "rnn_scratch") \
        if device.type == "cpu" else None
    if reason and kernel == "c":
        raise ConfigError(f"model.cell_kernel: c cannot be used here: {reason}; use "
                          "model.cell_kernel=auto (tensor ops)")
    if reason:
        print(f"note: C cell kernels unavailable ({reason}); using tensor ops", file=sys.stderr)


def run_training(cfg: Config, ctx: distributed.DistContext, device: torch.device,
                 quiet: bool, out, resume: dict | None = None,
                 resume_path: str | Path | None = None, overwrite: bool = False,
                 stop: StopRequest | None = None, shards: int = 1) -> dict:
    """`shards`: train.batch_shards resolved for this device (shards.resolve_batch_shards)."""
    batch_step = functools.partial(forward_backward, precision=cfg.train.precision)
    if shards > 1:
        if device.type != "cpu":
            raise ConfigError(f"train.batch_shards: {shards} splits batches "
                              f"across CPU cores; on {device.type} use 1 or auto")
        batch_step = ShardedForwardBackward(shards, cfg.train.precision)
    graphed = device.type == "cuda" and cfg.train.cuda_graphs
    if graphed and (cfg.train.precision != "fp32" or cfg.train.compile):
        raise ConfigError("train.cuda_graphs captures the fp32 eager step; with "
                          f"train.precision={cfg.train.precision} or train.compile=true set "
                          "train.cuda_graphs=false")
    check_cell_kernel(cfg, device)
    train_step = distributed.FaultInjector(ctx).wrap(batch_step)  # itself unless testing
    seed_everything(cfg.seed)
    corpus = load_corpus(cfg.data)
    splits = corpus.splits
    batches = BatchIterator(splits.train, cfg.data.batch_size, cfg.data.num_steps,
                            cfg.data.iterator, seed=cfg.seed, rank=ctx.rank,
                            world_size=ctx.world_size,
                            variable_length=variable_length_of(cfg.train))
    truncation = Truncation.from_config(cfg)
    model = build_model(cfg.model, len(corpus.vocab), cfg.train).to(device)
    distributed.seed_rank_streams(cfg.seed, ctx)
    optimizer = make_optimizer(cfg, model)
    schedule = LRSchedule(cfg.train, optimizer)
    stopper = EarlyStopping(cfg.train.early_stop_patience)
    average = WeightAverage(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    scored = average.model if average is not None else model  # what evaluation scores
    best_weights = BestWeights()  # in memory, for the test split (best.pt is the file twin)
    records: list[dict] = []
    on_step = (lambda: average.update(model)) if average is not None else None
    prompt = prefix_ids(corpus, cfg.train.prefix)

    out_dir = Path(cfg.out_dir)
    start_epoch, step, wall_offset, best, record, partial = 0, 0, 0.0, None, {}, None
    in_place = resume is not None and out_dir.resolve() == Path(resume_path).resolve().parent
    if in_place and overwrite:
        raise ConfigError("--overwrite would delete the checkpoint being resumed: drop it, or "
                          "resume into another folder with --set out_dir=...")
    if not in_place:
        claim_out_dir(out_dir, overwrite, delete=ctx.is_main)
    if resume is not None:
        position = restore_training(resume, cfg, model, optimizer, corpus.vocab,
                                    str(resume_path))
        start_epoch, step, wall_offset = position["epoch"], position["step"], position["wall_s"]
        best, record = resume["best"], resume.get("record") or {}
        restore_run_state(resume.get("run_state"), schedule, stopper, average, best_weights)
        if position.get("partial") and position["partial"]["batches"]:
            partial = EpochProgress.from_dict(position["partial"], device, ctx)
            step -= partial.batches  # `step` counts the steps before the current epoch

    # After the weights are loaded: the graphed copy and DDP start from the same values.
    train_model = model
    if graphed:
        from rnnlm.training.cuda_graphs import GraphedModel
        train_model = GraphedModel(model, batches.local_batch, cfg.data.num_steps)
    if cfg.train.compile:  # shares the parameters: evaluation, sampling and saving use `model`
        train_model = torch.compile(model)
    train_model = distributed.wrap_model(train_model, device)  # DDP when distributed

    metrics = recorder = None  # only rank 0 writes files
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
        metrics = MetricsLog(out_dir / "metrics.jsonl", append=resume is not None)
        if cfg.train.diagnostics:  # after a resume: eigenvalues "at the start" = the checkpoint's
            recorder = DiagnosticsRecorder(cfg, model, corpus.ids, batches, truncation, out_dir)
        metrics.keep_epochs(start_epoch)
    plot_path, plot_title = out_dir / "perplexity.png", f"{cfg.model.kind} ({out_dir.name})"

    def say(line: str) -> None:
        if not quiet:
            tqdm.write(line, file=out)

    def save(names: list[str], epoch: int, progress: EpochProgress | None) -> None:
        """Write checkpoints (rank 0); under DDP every rank must call it (it gathers lanes)."""
        if progress is not None and progress.state is not None and ctx.enabled:
            progress = EpochProgress(**{**vars(progress),
                                        "state": distributed.gather_lanes(progress.state)})
        if not ctx.is_main:
            return
        ckpt = make_checkpoint(cfg, model, optimizer, corpus.vocab, corpus.preprocess, {
            "epoch": epoch, "step": step + (progress.batches if progress else 0),
            "wall_s": wall_offset + time.perf_counter() - wall_start,
            "batch": progress.batches if progress else 0,
            "partial": progress.to_dict() if progress else None,
        }, best, record, run_state={
            "schedule": schedule.state_dict(), "early_stop": stopper.state_dict(),
            "average": average.state_dict() if average is not None else None,
            "best_weights": best_weights.state_dict(),
        })
        for name in names:
            atomic_save(ckpt, out_dir / name)

    def interrupted(epoch: int, batch: int) -> TrainingInterrupted:
        return TrainingInterrupted(stop, out_dir / "last.pt" if ctx.is_main else None,
                                   epoch, batch)

    n_params = sum(p.numel() for p in model.parameters())
    say(f"{cfg.model.kind}: {n_params:,} parameters, vocabulary {len(corpus.vocab)}, "
        f"{len(corpus):,} tokens from {corpus.source} ({corpus.preprocess}"
        f"{', cached' if corpus.from_cache else ''}), "
        f"{cfg.data.iterator} iteration, device {device}"
        + (f", {shards} batch shards" if shards > 1 else "")
        + (f", {ctx.world_size} processes (DDP)" if ctx.enabled else ""))
    if resume is not None:
        where = f"in epoch {start_epoch + 1} after batch {partial.batches}" if partial else \
            f"at the end of epoch {start_epoch}"
        say(f"resumed {resume_path} {where} (step {step + (partial.batches if partial else 0)}"
            f"), training to epoch {cfg.train.epochs}")
    if cfg.data.split is not None:
        parts = {"train": splits.train, **splits.heldout()}
        say("split: " + ", ".join(f"{name} {len(ids):,}" for name, ids in parts.items()))

    show_bar = not quiet and out.isatty()
    bar = tqdm(range(start_epoch, cfg.train.epochs), disable=not show_bar, unit="epoch",
               file=out, dynamic_ncols=True, initial=start_epoch, total=cfg.train.epochs)
    every = cfg.train.checkpoint_every
    agreement = distributed.StopAgreement(lambda: bool(stop))  # all ranks stop together
    if resume is not None:
        restore_rng(resume["rng"])  # last, after everything that draws from the generators
        if ctx.enabled:  # the checkpoint holds rank 0's torch stream: give each rank its own
            distributed.seed_rank_streams(cfg.seed + step, ctx)
    wall_start = time.perf_counter()
    try:
        for epoch in bar:
            result = train_epoch(train_model, batches.epoch(epoch, start_batch=partial.batches
                                                            if partial else 0),
                                 optimizer, cfg.train.clip_norm, batches.carries_state, device,
                                 train_step, start=partial, stop=agreement,
                                 truncation=truncation, epoch=epoch, on_step=on_step)
            partial = None
            if not result.complete:
                save(["last.pt"], epoch, result.progress)
                raise interrupted(epoch, result.batches)
            step += result.batches
            record = {
                "epoch": epoch + 1, "step": step,
                "train_loss": result.loss, "train_ppl": result.ppl,
                "train_bpc": result.loss / math.log(2),
                "tokens_per_s": result.tokens_per_s, "grad_norm": result.grad_norm,
                "clipped_frac": result.clipped_frac, "lr": optimizer.param_groups[0]["lr"],
                "epoch_s": result.seconds,
                "wall_s": wall_offset + time.perf_counter() - wall_start,
                "tokens": result.tokens,
            }
            if recorder is not None:
                record.update(recorder.epoch_record(model, epoch))
            every_eval = cfg.train.eval_every
            evaluating = epoch + 1 == cfg.train.epochs or \
                bool(every_eval and (epoch + 1) % every_eval == 0)
            stop_early = False
            if evaluating and splits.val is not None:
                # Every rank evaluates the same weights on the whole split, so every rank takes
                # the same best-weights, schedule and stopping decisions without talking.
                val = evaluate(scored, splits.val, cfg.data.eval_lanes, device)
                record.update(val.as_record("val"))
                best_weights.offer(val.ppl, epoch + 1, scored)
                stop_early = stopper.should_stop(val.ppl)
                say(f"epoch {epoch + 1:>4}  train ppl {result.ppl:8.3f}  val ppl "
                    f"{val.ppl:8.3f}  val bpc {val.bpc:6.3f}  lr {record['lr']:.3g}")
            schedule.after_epoch(record.get("val_ppl"))
            records.append(record)
            pe = cfg.train.predict_every
            progress = bool(pe and (epoch + 1) % pe == 0 and epoch + 1 < cfg.train.epochs)
            if metrics is not None:
                metrics.write(record)
                # The plot follows the validation passes; without validation, the progress
                # lines (a redraw every epoch would cost a book run more than its training).
                if "val_ppl" in record or (splits.val is None and progress):
                    plot_perplexity(records, plot_path, plot_title)
            bar.set_postfix(ppl=f"{result.ppl:.2f}", tok_s=f"{result.tokens_per_s:,.0f}")
            improved = improves(best, record)
            if improved:
                metric, value = tracked_metric(record)
                best = {"metric": metric, "value": value, "epoch": epoch + 1}
            last_due = epoch + 1 == cfg.train.epochs or bool(every and (epoch + 1) % every == 0)
            if improved or last_due:
                save(["best.pt"] * improved + ["last.pt"] * last_due, epoch + 1, None)
            agreement.begin_step()  # asked only now: a signal may have come during the saves
            if agreement.should_stop():
                if not last_due:
                    save(["last.pt"], epoch + 1, None)
                raise interrupted(epoch + 1, 0)
            if progress and not quiet:
                say(f"epoch {epoch + 1:>4}  ppl {result.ppl:8.3f}  grad {result.grad_norm:6.3f}  "
                    f"{result.tokens_per_s:>9,.0f} tok/s  | "
                    f"{predict_greedy(model, corpus.vocab, prompt, cfg.train.predict_chars)}")
            if stop_early:
                say(f"early stop after epoch {epoch + 1}: validation perplexity has not "
                    f"improved for {stopper.bad_evaluations} evaluations (best "
                    f"{best_weights.ppl:.3f} at epoch {best_weights.epoch})")
                if not last_due:
                    save(["last.pt"], epoch + 1, None)
                break
    finally:  # also when interrupted: the shard threads must not outlive the run
        bar.close()
        if isinstance(batch_step, ShardedForwardBackward):
            batch_step.close()
    if recorder is not None and record:
        say(f"diagnostics: {recorder.finish(model, record['epoch'] - 1)}")
    if not ctx.is_main:
        return record
    plot_perplexity(records, plot_path, plot_title)

    final_text = predict_greedy(model, corpus.vocab, prompt, cfg.train.predict_chars)
    if splits.val is not None and best_weights.ppl is not None:
        say(f"best validation perplexity {best_weights.ppl:.3f} (bpc "
            f"{math.log2(best_weights.ppl):.3f}) at epoch {best_weights.epoch}")
        record["best_val_ppl"], record["best_epoch"] = best_weights.ppl, best_weights.epoch
    if splits.test is not None:
        record.update(score_test_split(scored, best_weights, splits.test, cfg, device, metrics,
                                       say))
    print(final_text, file=out)
    print(f"perplexity {record['train_ppl']:.1f}, {record['tokens_per_s']:.1f} tokens/sec "
          f"on {device}", file=out)
    record["prediction"] = final_text
    return record


def restore_run_state(state: dict | None, schedule: LRSchedule, stopper: EarlyStopping,
                      average: WeightAverage | None, best_weights: BestWeights) -> None:
    """Put back what a run carries between epochs besides weights and optimizer, so that a
    resumed run follows the same schedule, stops at the same epoch, averages the same way
    and scores the test split with the same weights. Checkpoints of older versions have no
    run_state: those parts start afresh."""
    if not state:
        return
    schedule.load_state_dict(state.get("schedule"))
    if state.get("early_stop"):
        stopper.load_state_dict(state["early_stop"])
    if average is not None and state.get("average"):
        average.load_state_dict(state["average"])
    if state.get("best_weights"):
        best_weights.load_state_dict(state["best_weights"])


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
    if metrics is not None:  # rank 0 writes files
        metrics.write(record)
    return {k: v for k, v in record.items() if k.startswith("test_")}
