"""Time every batch of a run's first epochs: whether the first epoch is slower than the next,
and where (a warm-up over the first batches, or spread over the whole epoch).

    python scripts/first_epoch.py --config configs/heldout_lstm.yaml --set data.max_tokens=20000
    python scripts/first_epoch.py --config ... --set model.weight_dropout=0  # no DropConnect

It runs the trainer's own pieces on the CPU (the model, optimizer, batches and train_epoch, with the
weight average updated after every step as the run does) for --epochs epochs, without
validation, checkpoints or files (its first epoch is the trainer's first epoch, the same loss;
later ones differ by the learning-rate schedule), and prints for each epoch its time, the
process's CPU time (which other processes on a shared machine do not inflate, as long as one
thread runs), and its slowest batches. --flush-denormals runs with denormal floats flushed
to zero, to tell whether slow floating-point assists are the cause: when the losses printed
are the same with and without it, no denormal value was computed.
"""

from __future__ import annotations

import argparse
import time

import torch

from rnnlm.config import load_config
from rnnlm.config.checks import resolve_precision
from rnnlm.data.corpus import load_corpus
from rnnlm.data.iterators import BatchIterator
from rnnlm.models import build_model
from rnnlm.training.averaging import WeightAverage
from rnnlm.training.epoch import train_epoch
from rnnlm.training.run import make_optimizer, run_threads, seed_everything
from rnnlm.training.step import make_batch_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--flush-denormals", action="store_true")
    args = parser.parse_args()
    if args.flush_denormals and not torch.set_flush_denormal(True):
        raise SystemExit("this CPU cannot flush denormals")
    cfg = load_config(args.config, args.set)
    seed_everything(cfg.seed)
    corpus = load_corpus(cfg.data)
    model = build_model(cfg.model, len(corpus.vocab), cfg.train)
    optimizer = make_optimizer(cfg, model)
    average = WeightAverage(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    batches = BatchIterator(corpus.splits.train, cfg.data.batch_size, cfg.data.num_steps,
                            cfg.data.iterator, seed=cfg.seed)
    print(f"{cfg.model.kind}, weight_dropout {cfg.model.weight_dropout}, "
          f"{batches.num_batches(0)} batches of {cfg.data.batch_size} x {cfg.data.num_steps}, "
          f"{torch.get_num_threads() if cfg.train.threads is None else cfg.train.threads} "
          f"thread(s), torch {torch.__version__}")
    marks = []  # (wall, CPU) at the start of the epoch and after every optimizer step
    # the run's step: its precision and regularizers, one lane group
    step = make_batch_step(cfg, resolve_precision(cfg, torch.device("cpu")))

    def step_done():
        if average is not None:
            average.update(model)
        marks.append((time.perf_counter(), time.process_time()))

    with run_threads(cfg.train.threads, 1):
        for epoch in range(args.epochs):
            marks[:] = [(time.perf_counter(), time.process_time())]
            result = train_epoch(model, batches.epoch(epoch), optimizer, cfg.train.clip_norm,
                                 batches.carries_state, torch.device("cpu"), epoch=epoch,
                                 step=step, on_step=step_done)
            walls = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
            cpus = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
            slowest = sorted(range(len(walls)), key=walls.__getitem__, reverse=True)[:5]
            print(f"epoch {epoch + 1}: {sum(walls):.2f} s, CPU {sum(cpus):.2f} s, loss "
                  f"{result.loss!r}; median batch {sorted(walls)[len(walls) // 2]:.3f} s, "
                  f"slowest " + ", ".join(f"#{b + 1} {walls[b]:.2f} s" for b in slowest))


if __name__ == "__main__":
    main()
