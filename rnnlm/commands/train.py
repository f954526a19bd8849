"""`rnnlm train` (and train.py): train a model from a config, or continue a saved run."""

from __future__ import annotations

import argparse
import shlex
import sys

SUMMARY = "train a model from a YAML config, or continue a saved run"
DESCRIPTION = """Train a character-level recurrent language model: {prog} --config FILE,
or continue a saved run: {prog} --resume OUT_DIR/last.pt."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML preset for a new run, e.g. configs/lstm.yaml")
    parser.add_argument("--resume", metavar="CHECKPOINT",
                        help="continue the run saved in this checkpoint (its config is used; "
                             "--set still applies, e.g. --set train.epochs=800 to extend)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run even if out_dir holds a checkpoint (deletes it)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=50 (repeatable)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar or per-epoch lines, only the final summary")


def check(args: argparse.Namespace) -> str | None:
    if (args.config is None) == (args.resume is None):
        return ("give --config FILE for a new run or --resume CHECKPOINT to continue one (not "
                "both: on resume, change settings with --set)")
    return None


def run(args: argparse.Namespace) -> int:
    from rnnlm.checkpoint import load_checkpoint, resume_config
    from rnnlm.config import load_config
    from rnnlm.training.interrupts import TrainingInterrupted
    from rnnlm.training.run import train, train_new

    try:
        if args.resume:
            ckpt = load_checkpoint(args.resume)
            cfg = resume_config(ckpt, args.set, args.resume)
            train(cfg, quiet=args.quiet, resume=ckpt, resume_path=args.resume,
                  overwrite=args.overwrite)
        else:
            train_new(load_config(args.config, args.set), quiet=args.quiet,
                      overwrite=args.overwrite)
    except TrainingInterrupted as stop:
        if stop.checkpoint is not None:  # None on the other ranks of a DDP job
            where = f"in epoch {stop.epoch + 1} after batch {stop.batch}" if stop.batch else \
                f"at the end of epoch {stop.epoch}"
            print(f"{stop.signal_name}: stopped {where}; saved {stop.checkpoint}\n"
                  f"resume with: {args.invocation.prog} --resume "
                  f"{shlex.quote(str(stop.checkpoint))}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # Ctrl-C before training started: nothing to save yet
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    return 0
