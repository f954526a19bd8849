"""`rnnlm evaluate` (and evaluate.py): score checkpoints, alone and as an ensemble, on
held-out text."""

from __future__ import annotations

import argparse
import os
import sys

SUMMARY = "score checkpoints, and their ensemble, on held-out text"
DESCRIPTION = """\
Score checkpoints written by {train} on held-out text: their run's validation or test
split (rebuilt from the data config saved in the checkpoint), or any text file or folder.
Several checkpoints are also scored as an ensemble (the mean of their probabilities):
{prog} --checkpoint runs/a/best.pt --checkpoint runs/b/best.pt --split test"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="a best.pt or last.pt; repeat it to score several and their "
                             "ensemble")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--split", choices=["val", "test"], default="val",
                       help="the run's held-out split to score (default val)")
    where.add_argument("--text", metavar="PATH",
                       help="score this UTF-8 text file, or the .txt files of a folder, instead")
    parser.add_argument("--lanes", type=int, default=1,
                        help="contiguous pieces scored side by side, each from a zero state "
                             "(default 1: the whole text in one pass, as training validates "
                             "with data.eval_lanes 1)")
    parser.add_argument("--unknown", choices=["error", "replace"], default="error",
                        help="--text characters outside the vocabulary: stop with an error "
                             "(default) or score them as <unk>")
    parser.add_argument("--encoding-errors", choices=["strict", "replace"], default="strict",
                        help="--text bytes that are not UTF-8: stop with an error naming the "
                             "file and offset (default) or read them as U+FFFD")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    parser.add_argument("--threads", type=int,
                        help="CPU threads (default: one per lane, up to the CPU count; one "
                             "lane is a chain of matrix-vector products that a second thread "
                             "only slows down)")


def run(args: argparse.Namespace) -> int:
    import torch

    from rnnlm.config.checks import resolve_device
    from rnnlm.errors import ConfigError
    from rnnlm.evaluation.scoring import heldout_ids, load_scored, result_line, score, text_ids

    if args.lanes < 1:
        raise ConfigError(f"--lanes must be >= 1, got {args.lanes}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads or min(args.lanes, os.cpu_count() or 1))
    device = resolve_device(args.device)
    scored = load_scored(args.checkpoint, device)
    if args.text is not None:
        ids, label = text_ids(args.text, scored[0].vocab, scored[0].preprocess, args.unknown,
                              args.encoding_errors)
    else:
        ids, label = heldout_ids(scored, args.split)
    alone, together = score(scored, ids, args.lanes, device)
    print(f"{label}: {len(ids):,} tokens, {alone[0].tokens:,} predicted, "
          f"{args.lanes} lane(s)")
    for s, result in zip(scored, alone, strict=True):
        epoch = "" if s.epoch is None else f" (epoch {s.epoch})"
        print(result_line(result, f"{s.path}{epoch}"))
    if together is not None:
        print(result_line(together, f"ensemble of {len(scored)} (mean of their probabilities)"))
    sys.stdout.flush()
    return 0
