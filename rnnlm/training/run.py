"""A whole training run around train_epoch, as named steps that read top to bottom.

`run_training` is the run; each step is one method of `TrainingRun`, which holds its parts:

    TrainingRun(...)      set up: check the config against this machine, then build the
                          corpus, the batch iterator, the model, the optimizer, the schedule,
                          the weight average and the best so far
    take_out_dir          claim out_dir (or continue in the folder of the resumed checkpoint)
    resume                continue a checkpoint exactly where it stopped
    start                 what trains (CUDA graphs, compile, DDP), the run's files, the opening
                          lines, the progress bar; a resumed run's random generators come last
    one_epoch             train_epoch (rnnlm.training.epoch) over this epoch's batches
    end_of_epoch          the record, validation, best so far, checkpoints, stop decisions and
                          the progress line
    finish                the plot, the final prediction, the test split, the summary lines

`train` is the public entry around it: the lock on out_dir (held for the whole run, so a
second run into the folder is refused), processes (DDP), threads and signal handlers.
"""

from __future__ import annotations

import math
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rnnlm.bptt.truncation import Truncation, variable_length_of
from rnnlm.checkpoint import (
    atomic_save,
    check_same_data,
    claim_out_dir,
    load_initial_weights,
    make_checkpoint,
    restore_rng,
    restore_training,
)
from rnnlm.config import Config, ConfigError, dump_yaml
from rnnlm.config.checks import check_distributed, check_run, resolve_device, resolve_precision
from rnnlm.data.corpus import load_corpus
from rnnlm.data.iterators import BatchIterator
from rnnlm.diagnostics.report import DiagnosticsRecorder
from rnnlm.evaluation.evaluate import evaluate
from rnnlm.evaluation.sampling import encode_prefix, predict_greedy
from rnnlm.files import ensure_directory, lock_out_dir, write_atomic
from rnnlm.models import LanguageModel, build_model
from rnnlm.training import auto_resume, distributed
from rnnlm.training.averaging import WeightAverage
from rnnlm.training.best import BestSoFar, BestWeights
from rnnlm.training.divergence import check_weights_before_saving
from rnnlm.training.epoch import EpochProgress, EpochResult, format_ppl, train_epoch
from rnnlm.training.interrupts import StopRequest, TrainingInterrupted, stop_on_signals
from rnnlm.training.metrics import METRICS_FILE, MetricsLog, epoch_record
from rnnlm.training.schedules import LRSchedule
from rnnlm.training.step import ShardedForwardBackward, make_batch_step, resolve_batch_shards


def train(cfg: Config, quiet: bool = False, out=sys.stdout, resume: dict | None = None,
          resume_path: str | Path | None = None, overwrite: bool = False,
          stop: StopRequest | None = None, progress: bool | None = None,
          init_from: tuple[dict, str | Path] | None = None) -> dict:
    """Run a whole training job from a config; returns the last epoch's record (with the
    best validation and the test metrics when the data is split, and the final prediction).

    `resume` (a loaded checkpoint, read from `resume_path`) continues that run exactly where
    it stopped. A new run refuses an out_dir that holds a checkpoint unless `overwrite`.
    `init_from` (a loaded checkpoint and its path: --init-from) starts a new run from that
    checkpoint's trained weights (rnnlm.checkpoint.load_initial_weights), with everything
    else fresh.
    SIGINT/SIGTERM stop the run after the current batch, write last.pt and raise
    TrainingInterrupted; pass `stop` to control stopping yourself (no handlers installed).
    `progress`: a progress bar over the epochs; None shows one when `out` is a terminal and
    the run is not `quiet` (tqdm.auto: in Jupyter it is a widget).

    Under torchrun this process is one rank of a data-parallel job (rnnlm.training.distributed);
    alone it is the whole job."""
    ctx = distributed.context_from_env()
    check_distributed(cfg, ctx.world_size)
    device = distributed.device_for_rank(resolve_device(cfg.device), ctx)
    quiet = quiet or not ctx.is_main
    show_bar = (not quiet and out.isatty()) if progress is None else progress and ctx.is_main
    own_stop = stop is None
    stop = StopRequest() if own_stop else stop
    shards = resolve_batch_shards(cfg, device, ctx.enabled)
    signals = stop_on_signals(stop, distributed.signal_repeat_window_s()) if own_stop \
        else nullcontext(stop)
    with hold_out_dir(cfg, ctx), distributed.process_group(ctx, device), \
            run_threads(cfg.train.threads, shards), signals:
        return run_training(cfg, ctx, device, quiet, out, resume, resume_path, overwrite,
                            stop, shards, show_bar, init_from=init_from)


def train_new(cfg: Config, overwrite: bool = False, out=sys.stdout, **options) -> dict | None:
    """A run from a config, as `rnnlm train --config` starts it: with train.auto_resume, one
    that finds out_dir/last.pt continues it (and does nothing when that run had already
    finished: None); otherwise a new run. `options` go to `train`. out_dir is locked
    before the plan reads it, so no other run can change it in between."""
    with hold_out_dir(cfg):
        resume, path = None, None
        if cfg.train.auto_resume:
            plan = auto_resume.plan(cfg, overwrite)
            if plan.done:
                if distributed.is_main_process():
                    print(f"{plan.path} has already completed train.epochs="
                          f"{cfg.train.epochs}: nothing left to train", file=sys.stderr)
                return None
            overwrite, resume, path = plan.overwrite, plan.checkpoint, plan.path
            if resume is not None:  # it started from the --init-from weights already
                options.pop("init_from", None)
        return train(cfg, out=out, overwrite=overwrite, resume=resume, resume_path=path,
                     **options)


OUT_DIR_HINT = "pick another out_dir (--set out_dir=...)"


def hold_out_dir(cfg: Config, ctx: distributed.DistContext | None = None):
    """The run's exclusive lock on out_dir (rnnlm.files.lock_out_dir), held by rank 0 alone:
    all ranks of a DDP job write into one out_dir, and none may be refused by its own rank 0.
    A second run into the folder is refused at once, naming the process that holds it."""
    ctx = ctx or distributed.context_from_env()
    return lock_out_dir(cfg.out_dir, hint=OUT_DIR_HINT) if ctx.is_main else nullcontext()


def run_training(cfg: Config, ctx: distributed.DistContext, device: torch.device,
                 quiet: bool, out, resume: dict | None, resume_path: str | Path | None,
                 overwrite: bool, stop: StopRequest, shards: int, show_bar: bool,
                 init_from: tuple[dict, str | Path] | None = None) -> dict:
    """The run, step by step (see the module docstring). `shards`: train.batch_shards
    resolved for this device (rnnlm.training.step.resolve_batch_shards)."""
    if init_from is not None and overwrite and \
            Path(init_from[1]).resolve().parent == Path(cfg.out_dir).resolve():
        raise ConfigError(f"--overwrite would delete {init_from[1]}, the checkpoint given to "
                          f"--init-from: start the new run in another out_dir (--set "
                          f"out_dir=...)")
    run = TrainingRun(cfg, ctx, device, shards, stop, quiet, out, init_from=init_from)
    try:
        run.take_out_dir(resume_path if resume is not None else None, overwrite)
        if resume is not None:
            run.resume(resume, resume_path)
        run.start(show_bar)
        for epoch in run.bar:
            result = run.one_epoch(epoch)
            if not run.end_of_epoch(epoch, result):
                break  # early stopping
    finally:  # also when interrupted: the shard threads must not outlive the run
        run.close()
    return run.finish()


class TrainingRun:
    """One training run: its parts, built by the set-up, and its position as it goes."""

    def __init__(self, cfg: Config, ctx: distributed.DistContext, device: torch.device,
                 shards: int, stop: StopRequest, quiet: bool, out,
                 init_from: tuple[dict, str | Path] | None = None):
        """Set up: the parts of the run, built in the order that fixes the random streams
        (the seed, then the model's initial weights). `init_from`: a checkpoint and its path
        whose trained weights replace the initial ones (--init-from)."""
        self.cfg, self.ctx, self.device, self.stop = cfg, ctx, device, stop
        self.quiet, self.out = quiet, out

        check_run(cfg, device, shards)  # the config against this machine, before building

        # forward and backward of one batch (rnnlm.training.step)
        self.precision = resolve_precision(cfg, device)  # train.precision: auto resolved
        self.batch_step = make_batch_step(cfg, self.precision, shards)  # with the regularizers
        self.shards = shards
        self.train_step = distributed.FaultInjector(ctx).wrap(self.batch_step)  # unless testing
        seed_everything(cfg.seed)
        self.corpus = load_corpus(cfg.data)
        self.batches = BatchIterator(self.corpus.splits.train, cfg.data.batch_size,
                                     cfg.data.num_steps, cfg.data.iterator, seed=cfg.seed,
                                     rank=ctx.rank, world_size=ctx.world_size,
                                     variable_length=variable_length_of(cfg.train))
        self.truncation = Truncation.from_config(cfg)
        self.model = build_model(cfg.model, len(self.corpus.vocab), cfg.train,
                                 device.type).to(device)
        # --init-from: the checkpoint's weights over the fresh ones, before the optimizer and
        # the average take them; loading draws nothing, so the data order and every later
        # random draw are those of the same run without it
        self.init_from: tuple[str, int] | None = None  # its path and its run's epochs
        if init_from is not None:
            load_initial_weights(self.model, init_from[0], cfg, self.corpus.vocab,
                                 str(init_from[1]))
            self.init_from = (str(init_from[1]), init_from[0]["progress"]["epoch"])
        distributed.seed_rank_streams(cfg.seed, ctx)
        self.optimizer = make_optimizer(cfg, self.model)
        self.schedule = LRSchedule(cfg.train, self.optimizer)
        self.average = WeightAverage(self.model, cfg.train.ema_decay) \
            if cfg.train.ema_decay else None
        self.scored = self.average.model if self.average is not None else self.model  # evaluated
        self.on_step = (lambda: self.average.update(self.model)) \
            if self.average is not None else None  # after every optimizer step
        self.best = BestSoFar(cfg.train.early_stop_patience)
        # the prompt of the progress lines; characters outside the text read as <unk>
        self.prompt = encode_prefix(cfg.train.prefix, self.corpus.vocab, self.corpus.preprocess,
                                    unknown="replace", name=lambda option: f"train.{option}")
        self.out_dir = Path(cfg.out_dir)

        # Filled by the steps that follow.
        self.train_model: torch.nn.Module = self.model  # what trains: maybe graphed or wrapped
        self.metrics: MetricsLog | None = None  # only rank 0 writes files
        self.recorder: DiagnosticsRecorder | None = None
        self.bar: tqdm | None = None
        self.agreement: distributed.StopAgreement | None = None
        self.records: list[dict] = []  # every epoch's record, for the plot
        self.record: dict = {}  # the last complete epoch's record
        self.resumed: tuple[str | Path, dict] | None = None  # the checkpoint's path and rng
        # The position: complete epochs, optimizer steps before the current epoch, the wall
        # time of earlier sessions of this run, and the totals of a resumed part epoch.
        self.start_epoch, self.step, self.wall_offset = 0, 0, 0.0
        self.wall_start = time.perf_counter()
        self.partial: EpochProgress | None = None

    # ------------------------------------------------------------------ before the first epoch

    def take_out_dir(self, resume_path: str | Path | None, overwrite: bool) -> None:
        """A new run claims out_dir, which must hold no checkpoint unless `overwrite`; a run
        resumed from a checkpoint in out_dir continues there."""
        in_place = resume_path is not None and \
            self.out_dir.resolve() == Path(resume_path).resolve().parent
        if in_place and overwrite:
            raise ConfigError("--overwrite would delete the checkpoint being resumed: drop it, "
                              "or resume into another folder with --set out_dir=...")
        if not in_place:
            claim_out_dir(self.out_dir, overwrite, delete=self.ctx.is_main)

    def resume(self, ckpt: dict, path: str | Path) -> None:
        """Continue the checkpoint `ckpt` (read from `path`): weights, optimizer, position,
        the best so far, the schedule and the average; when it stopped inside an epoch, that
        epoch's running totals and carried state."""
        position = restore_training(ckpt, self.cfg, self.model, self.optimizer,
                                    self.corpus.vocab, str(path))
        note = check_same_data(ckpt, self.corpus.fingerprint, str(path))  # a changed text
        if note is not None and self.ctx.is_main:
            print(note, file=sys.stderr)
        self.start_epoch, self.step = position["epoch"], position["step"]
        self.wall_offset = position["wall_s"]
        self.record = ckpt.get("record") or {}
        run_state = ckpt.get("run_state")  # absent in checkpoints of older versions
        self.best.restore(ckpt["best"], run_state)
        if run_state:
            self.schedule.load_state_dict(run_state.get("schedule"))
            if self.average is not None and run_state.get("average"):
                self.average.load_state_dict(run_state["average"])
        if position.get("partial") and position["partial"]["batches"]:
            self.partial = EpochProgress.from_dict(position["partial"], self.device, self.ctx)
            self.step -= self.partial.batches  # `step` counts the steps before the epoch
        self.resumed = (path, ckpt["rng"])

    def start(self, show_bar: bool) -> None:
        """Everything between the loaded weights and the first batch."""
        self.train_model = self.model_that_trains()
        if self.ctx.is_main:  # only rank 0 writes files
            self.open_files()
        self.announce()
        self.bar = tqdm(range(self.start_epoch, self.cfg.train.epochs), disable=not show_bar,
                        unit="epoch", file=self.out, dynamic_ncols=True,
                        initial=self.start_epoch, total=self.cfg.train.epochs)
        self.agreement = distributed.StopAgreement(lambda: bool(self.stop))  # ranks stop together
        if self.resumed is not None:
            restore_rng(self.resumed[1])  # last, after everything that draws from the generators
            if self.ctx.enabled:  # the checkpoint holds rank 0's torch stream: one per rank
                distributed.seed_rank_streams(self.cfg.seed + self.step, self.ctx)
        self.wall_start = time.perf_counter()

    def model_that_trains(self) -> torch.nn.Module:
        """`model` as the epochs run it: captured in CUDA graphs, compiled, wrapped by DDP.
        Made after the weights are loaded, so every copy starts from the same values; all
        share the parameters, and evaluation, sampling and saving use `model` itself."""
        cfg, model = self.cfg, self.model
        if self.device.type == "cuda" and cfg.train.cuda_graphs:
            from rnnlm.training.cuda_graphs import GraphedModel
            model = GraphedModel(model, self.batches.local_batch, cfg.data.num_steps)
        if cfg.train.compile:
            model = torch.compile(self.model)
        return distributed.wrap_model(model, self.device)  # itself unless distributed

    def open_files(self) -> None:
        """out_dir with config.yaml, metrics.jsonl (continued by a resumed run, without the
        epochs it is about to redo) and the diagnostics recorder."""
        cfg = self.cfg
        ensure_directory(self.out_dir, "out_dir", OUT_DIR_HINT)
        write_atomic(self.out_dir / "config.yaml", dump_yaml(cfg))
        self.metrics = MetricsLog(self.out_dir / METRICS_FILE, append=self.resumed is not None)
        if cfg.train.diagnostics:  # after a resume: "at the start" = the checkpoint's
            self.recorder = DiagnosticsRecorder(cfg, self.model, self.corpus.ids, self.batches,
                                                self.truncation, self.out_dir)
        self.metrics.keep_epochs(self.start_epoch)

    def announce(self) -> None:
        """The opening lines: the model and the data, where a resumed run continues, the
        split."""
        cfg, corpus = self.cfg, self.corpus
        n_params = sum(p.numel() for p in self.model.parameters())
        self.say(f"{cfg.model.kind}: {n_params:,} parameters, vocabulary {len(corpus.vocab)}, "
                 f"{len(corpus):,} tokens from {corpus.source} ({corpus.preprocess}"
                 f"{', cached' if corpus.from_cache else ''}), "
                 f"{cfg.data.iterator} iteration, device {self.device}"
                 + (f", {self.precision}" + (" (train.precision: auto)"
                                             if cfg.train.precision == "auto" else "")
                    if self.precision != "fp32" else "")
                 + (f", {self.shards} batch shards" if self.shards > 1 else "")
                 + (f", {self.ctx.world_size} processes (DDP)" if self.ctx.enabled else ""))
        if self.resumed is not None:
            partial = self.partial
            where = f"in epoch {self.start_epoch + 1} after batch {partial.batches}" if partial \
                else f"at the end of epoch {self.start_epoch}"
            self.say(f"resumed {self.resumed[0]} {where} (step "
                     f"{self.step + (partial.batches if partial else 0)}), training to epoch "
                     f"{cfg.train.epochs}")
        if self.init_from is not None:
            self.say(f"a new run from the trained weights of {self.init_from[0]} (after its "
                     f"epoch {self.init_from[1]}), with a fresh optimizer and schedule, "
                     f"training to epoch {cfg.train.epochs}")
        if cfg.data.split is not None:
            splits = corpus.splits
            parts = {"train": splits.train, **splits.heldout()}
            self.say("split: " + ", ".join(f"{name} {len(ids):,}" for name, ids in parts.items()))

    # ------------------------------------------------------------------ each epoch

    def one_epoch(self, epoch: int) -> EpochResult:
        """train_epoch over the batches of the epoch with index `epoch`, from the batch a
        resumed checkpoint stopped at. When a stop request ends it early, last.pt keeps the
        position inside the epoch and TrainingInterrupted is raised."""
        start, self.partial = self.partial, None
        batches = self.batches.epoch(epoch, start_batch=start.batches if start else 0)
        result = train_epoch(self.train_model, batches, self.optimizer, self.cfg.train.clip_norm,
                             self.batches.carries_state, self.device, self.train_step,
                             start=start, stop=self.agreement, truncation=self.truncation,
                             epoch=epoch, on_step=self.on_step)
        if not result.complete:
            self.save(["last.pt"], epoch, result.progress)
            raise self.interrupted(epoch, result.batches)
        self.step += result.batches
        return result

    def end_of_epoch(self, epoch: int, result: EpochResult) -> bool:
        """After the epoch with index `epoch`; returns False when early stopping ends the
        run. The order matters: checkpoints hold the schedule and the best so far after this
        epoch, and a stop request is heeded only once they are written."""
        record = self.record = epoch_record(
            epoch, self.step, result, self.optimizer.param_groups[0]["lr"],
            self.wall_offset + time.perf_counter() - self.wall_start)
        if self.recorder is not None:
            record.update(self.recorder.epoch_record(self.model, epoch))
        stop_early = self.validate(epoch, record)
        self.schedule.after_epoch(record.get("val_ppl"))
        self.log(epoch, record, result)
        last_saved = self.save_checkpoints(epoch, record)
        self.agreement.begin_step()  # asked only now: a signal may have come during the saves
        if self.agreement.should_stop():
            if not last_saved:
                self.save(["last.pt"], epoch + 1, None)
            raise self.interrupted(epoch + 1, 0)
        if self.predicting(epoch) and not self.quiet:
            text = predict_greedy(self.model, self.corpus.vocab, self.prompt,
                                  self.cfg.train.predict_chars)
            self.say(f"epoch {epoch + 1:>4}  ppl {format_ppl(result.ppl):>8}  grad "
                     f"{result.grad_norm:6.3f}  {result.tokens_per_s:>9,.0f} tok/s  | {text}")
        if stop_early:
            stopper, weights = self.best.stopper, self.best.weights
            self.say(f"early stop after epoch {epoch + 1}: validation perplexity has not "
                     f"improved for {stopper.bad_evaluations} evaluations (best "
                     f"{weights.ppl:.3f} at epoch {weights.epoch})")
            if not last_saved:
                self.save(["last.pt"], epoch + 1, None)
        return not stop_early

    def validate(self, epoch: int, record: dict) -> bool:
        """Validation when it is due (every train.eval_every epochs and after the last) and
        the data has a validation split: its numbers join the record and the best so far.
        Returns whether early stopping ends the run."""
        t, val_ids = self.cfg.train, self.corpus.splits.val
        due = epoch + 1 == t.epochs or bool(t.eval_every and (epoch + 1) % t.eval_every == 0)
        if not due or val_ids is None:
            return False
        # Every rank evaluates the same weights on the whole split, so every rank takes the
        # same best-weights, schedule and stopping decisions without talking.
        val = evaluate(self.scored, val_ids, self.cfg.data.eval_lanes, self.device)
        record.update(val.as_record("val"))
        stop_early = self.best.validated(val.ppl, epoch + 1, self.scored)
        self.say(f"epoch {epoch + 1:>4}  train ppl {format_ppl(record['train_ppl']):>8}  val ppl "
                 f"{format_ppl(val.ppl):>8}  val bpc {val.bpc:6.3f}  lr {record['lr']:.3g}")
        return stop_early

    def predicting(self, epoch: int) -> bool:
        """Whether the epoch ends with a progress line and its greedy prediction (every
        train.predict_every epochs; the last epoch's prediction closes the run instead)."""
        pe = self.cfg.train.predict_every
        return bool(pe and (epoch + 1) % pe == 0 and epoch + 1 < self.cfg.train.epochs)

    def log(self, epoch: int, record: dict, result: EpochResult) -> None:
        """The record into metrics.jsonl, the plot redrawn, the bar's numbers."""
        self.records.append(record)
        if self.metrics is not None:
            self.metrics.write(record)
            # The plot follows the validation passes; without validation, the progress
            # lines (a redraw every epoch would cost a book run more than its training).
            if "val_ppl" in record or (self.corpus.splits.val is None and self.predicting(epoch)):
                plot_perplexity(self.records, *self.plot_where())
        self.bar.set_postfix(ppl=format_ppl(result.ppl, 2), tok_s=f"{result.tokens_per_s:,.0f}")

    def save_checkpoints(self, epoch: int, record: dict) -> bool:
        """best.pt when the epoch is the best so far, last.pt when it is due (every
        train.checkpoint_every epochs and after the last); returns whether last.pt was
        written."""
        improved = self.best.improved_by(record)
        every = self.cfg.train.checkpoint_every
        last_due = epoch + 1 == self.cfg.train.epochs or \
            bool(every and (epoch + 1) % every == 0)
        if improved or last_due:
            self.save(["best.pt"] * improved + ["last.pt"] * last_due, epoch + 1, None)
        return last_due

    def save(self, names: list[str], epoch: int, progress: EpochProgress | None) -> None:
        """Write checkpoints after `epoch` complete epochs and, inside the next one, its
        `progress` (rank 0 writes); under DDP every rank must call it (it gathers lanes)."""
        ctx = self.ctx
        if progress is not None and progress.state is not None and ctx.enabled:
            progress = EpochProgress(**{**vars(progress),
                                        "state": distributed.gather_lanes(progress.state)})
        # every rank holds the same weights, so every rank refuses alike
        check_weights_before_saving([self.model, self.average and self.average.model],
                                    epoch + 1 if progress else epoch,
                                    progress.batches if progress else None)
        if not ctx.is_main:
            return
        batches = progress.batches if progress else 0
        position = {"epoch": epoch, "step": self.step + batches,
                    "wall_s": self.wall_offset + time.perf_counter() - self.wall_start,
                    "batch": batches, "partial": progress.to_dict() if progress else None}
        average = self.average.state_dict() if self.average is not None else None
        run_state = {"schedule": self.schedule.state_dict(), "average": average,
                     **self.best.state_dicts()}
        ckpt = make_checkpoint(self.cfg, self.model, self.optimizer, self.corpus.vocab,
                               self.corpus.preprocess, position, self.best.metric, self.record,
                               run_state, data=self.corpus.fingerprint)
        for name in names:
            atomic_save(ckpt, self.out_dir / name)

    def interrupted(self, epoch: int, batch: int) -> TrainingInterrupted:
        return TrainingInterrupted(self.stop, self.out_dir / "last.pt" if self.ctx.is_main
                                   else None, epoch, batch)

    # ------------------------------------------------------------------ after the last epoch

    def close(self) -> None:
        """Release what the epochs held (also when the run stops with an error)."""
        if self.bar is not None:
            self.bar.close()
        if isinstance(self.batch_step, ShardedForwardBackward):
            self.batch_step.close()

    def finish(self) -> dict:
        """The last plot, the final prediction, the best validation and the test split (rank
        0), the summary lines; returns the last epoch's record with them."""
        record, weights = self.record, self.best.weights
        if self.recorder is not None and record:
            self.say(f"diagnostics: {self.recorder.finish(self.model, record['epoch'] - 1)}")
        if not self.ctx.is_main:
            return record
        plot_perplexity(self.records, *self.plot_where())

        final_text = predict_greedy(self.model, self.corpus.vocab, self.prompt,
                                    self.cfg.train.predict_chars)
        splits = self.corpus.splits
        if splits.val is not None and weights.ppl is not None:
            self.say(f"best validation perplexity {weights.ppl:.3f} (bpc "
                     f"{math.log2(weights.ppl):.3f}) at epoch {weights.epoch}")
            record["best_val_ppl"], record["best_epoch"] = weights.ppl, weights.epoch
        if splits.test is not None:
            record.update(score_test_split(self.scored, weights, splits.test, self.cfg,
                                           self.device, self.metrics, self.say))
        print(final_text, file=self.out)
        print(f"perplexity {format_ppl(record['train_ppl'], 1)}, "
              f"{record['tokens_per_s']:.1f} tokens/sec "
              f"on {self.device}", file=self.out)
        record["prediction"] = final_text
        return record

    # ------------------------------------------------------------------ small helpers

    def say(self, line: str) -> None:
        if not self.quiet:
            tqdm.write(line, file=self.out)

    def plot_where(self) -> tuple[Path, str]:
        return self.out_dir / "perplexity.png", f"{self.cfg.model.kind} ({self.out_dir.name})"


def score_test_split(scored: LanguageModel, best: BestWeights, test_ids, cfg: Config,
                     device: torch.device, metrics: MetricsLog | None, say) -> dict:
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


# ---------------------------------------------------------------------- the parts of the set-up


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
    params = list(model.parameters())
    # PyTorch's fused kernels update every parameter in one pass over its memory, where the
    # default (foreach) makes a pass per elementwise op: AdamW on the held-out LSTM's 3.3M
    # weights took 8.6 ms a step fused against 45.6 ms (one thread), which at 32 lanes was as
    # much time as the LSTM's own forward and backward. The results agree to float32
    # rounding (tests/training/test_run.py). Fused kernels exist for CPU and CUDA tensors.
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    kind = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    # the parameters the model exempts from weight decay in a group of their own (none for
    # the classic kinds: one group, as before)
    exempt = model.no_weight_decay()
    named = list(model.named_parameters())
    groups = [{"params": [p for name, p in named if name not in exempt]}]
    if exempt:
        groups.append({"params": [p for name, p in named if name in exempt],
                       "weight_decay": 0.0})
    optimizer = kind[t.optimizer](groups, lr=t.lr, weight_decay=t.weight_decay,
                                  **({"fused": True} if fused else {}))
    if fused:
        optimizer.register_step_pre_hook(contiguous_gradients)
    return optimizer


def contiguous_gradients(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Before a fused step: the fused kernels (torch 2.13, CPU) read a gradient's memory as if
    it were laid out like its parameter, so a transposed or expanded gradient (the lane shards'
    sums, some hand-written backwards) would update the wrong elements without any error
    (tests/training/test_optimizer.py); such gradients are copied to the parameter's layout."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is not None and param.grad.stride() != param.stride():
                param.grad = param.grad.contiguous()


def plot_perplexity(records: list[dict], path: Path, title: str) -> None:
    """plots.plot_perplexity, imported at the first drawing: matplotlib takes about 0.5 s to
    import, which a run that stops at a config error, and the tools and the notebook API that
    import this module, would pay."""
    from rnnlm.training import plots

    plots.plot_perplexity(records, path, title)
