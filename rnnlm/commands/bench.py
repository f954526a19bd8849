"""`rnnlm bench` (and bench.py): training and generation speed of the book presets against
the D2L reference; the benchmark itself is rnnlm.tools.bench."""

from __future__ import annotations

import argparse
from pathlib import Path

from rnnlm.tools.presets import BOOK_PRESETS

SUMMARY = "speed of the book presets against the D2L reference"
DESCRIPTION = """\
Training and generation speed of the book presets, side by side with the D2L reference.

For each preset: our tokens/s, the D2L reference's tokens/s measured in the same run
(`d2l_reference.sh`, when it is available), the ratio, the model's FLOPs per token, the fp32
matmul throughput measured at the model's own shapes (the roofline), the fraction of it we
reach, and the final perplexity of both after one long run each, so that speed can never
come from doing less work. Speeds come from short rounds taken in turns (ours, then the
reference, --rounds times): the machine's speed drifts, and a ratio means something only
between two trainers measured at the same moment. Then generation speed against D2L's
predict_ch8.

    {prog}                       # all seven presets, 500 epochs (the book's budget)
    {prog} --epochs 30 --presets rnn_scratch gru
    {prog} --epochs 5 --variant train.precision=bf16 --variant train.compile=true

Each --variant adds, per preset, a row trained with those overrides (comma-separated), with
its speed relative to the preset's own row, measured in the same rounds, and its perplexity."""
FORMATTER = argparse.RawDescriptionHelpFormatter
BENCHMARKS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", nargs="+", default=BOOK_PRESETS, choices=BOOK_PRESETS)
    parser.add_argument("--epochs", type=int, default=500, help="measured epochs (default 500)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-reference", action="store_true", help="skip the D2L reference")
    parser.add_argument("--gen-chars", type=int, default=10_000)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for our runs, e.g. --set train.threads=1")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,...]",
                        help="also train each preset with these overrides (repeatable)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="speed rounds: ours and the reference trained --round-epochs "
                             "epochs in turn, this many times; speeds and ratios are medians "
                             "over rounds (0: the speeds of the long runs)")
    parser.add_argument("--round-epochs", type=int, default=20)
    parser.add_argument("--write", default=str(BENCHMARKS_PAGE),
                        help="markdown file for the table ('' to skip)")


def run(args: argparse.Namespace) -> int:
    from rnnlm.tools.bench import benchmark

    return benchmark(args, args.invocation.line)
