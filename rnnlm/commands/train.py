"""`rnnlm train` (and train.py): train a model from a config, or continue a saved run."""

from __future__ import annotations

import argparse
import shlex
import sys

SUMMARY = "train a model from a YAML config, or continue a saved run"
DESCRIPTION = """Train a character-level recurrent language model: {prog} --config FILE,
or continue a saved run: {prog} --resume OUT_DIR/last.pt, or start a new run from a saved
run's weights (fine-tuning): {prog} --config FILE --init-from OUT_DIR/last.pt."""
EPILOG = """exit status: 0 when the run is done; 2 for a mistake in the command, config or files
(one line on stderr); 3 when training diverged (a NaN or infinite loss, gradient norm or
weight: training stops at once, nothing is saved after it, the checkpoints saved before it are
kept); 130 or 143 when stopped by SIGINT or SIGTERM (last.pt saved, resume with --resume)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML preset for a new run, e.g. configs/lstm.yaml")
    parser.add_argument("--resume", metavar="CHECKPOINT",
                        help="continue the run saved in this checkpoint (its config is used; "
                             "--set still applies, e.g. --set train.epochs=800 to extend)")
    parser.add_argument("--init-from", metavar="CHECKPOINT",
                        help="with --config: start a new run (fresh optimizer and schedule, "
                             "epoch 1, its own out_dir) from the trained weights of this "
                             "checkpoint, e.g. to fine-tune on another text; the training "
                             "weights, not the averaged (EMA) copy that sample uses; needs the "
                             "same model.kind and parameter shapes, and a text whose characters "
                             "the checkpoint knows")
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
    if args.init_from is not None and args.resume is not None:
        return ("--init-from starts a new run from a checkpoint's weights, --resume continues "
                "one: give --init-from with --config, or --resume alone")
    return None


def run(args: argparse.Namespace) -> int:
    from rnnlm.checkpoint import load_checkpoint, resume_config
    from rnnlm.config import load_config
    from rnnlm.training import distributed
    from rnnlm.training.divergence import TrainingDiverged
    from rnnlm.training.interrupts import TrainingInterrupted
    from rnnlm.training.run import train, train_new

    try:
        if args.resume:
            ckpt = load_checkpoint(args.resume)
            cfg = resume_config(ckpt, args.set, args.resume)
            train(cfg, quiet=args.quiet, resume=ckpt, resume_path=args.resume,
                  overwrite=args.overwrite)
        else:
            cfg = load_config(args.config, args.set)
            init_from = None if args.init_from is None else \
                (load_checkpoint(args.init_from), args.init_from)
            train_new(cfg, quiet=args.quiet, overwrite=args.overwrite, init_from=init_from)
    except TrainingInterrupted as stop:
        if stop.checkpoint is not None:  # None on the other ranks of a DDP job
            where = f"in epoch {stop.epoch + 1} after batch {stop.batch}" if stop.batch else \
                f"at the end of epoch {stop.epoch}"
            print(f"{stop.signal_name}: stopped {where}; saved {stop.checkpoint}\n"
                  f"resume with: {args.invocation.prog} --resume "
                  f"{shlex.quote(str(stop.checkpoint))}", file=sys.stderr)
        return stop.exit_code
    except TrainingDiverged as diverged:
        if distributed.is_main_process():  # one line per job, not one per DDP rank
            print(f"error: {diverged.describe(kept_checkpoint(cfg.out_dir))}", file=sys.stderr)
        return diverged.exit_code
    except KeyboardInterrupt:  # Ctrl-C before training started: nothing to save yet
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    return 0


def kept_checkpoint(out_dir: str) -> str:
    """What a diverged run leaves: the last.pt saved before the divergence, if any."""
    from pathlib import Path

    last = Path(out_dir) / "last.pt"
    if last.is_file():
        return f"nothing was saved after it, {last} holds the run from before"
    return "nothing was saved (no checkpoint had been written yet)"
