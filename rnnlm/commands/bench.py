"""`rnnlm bench` (and bench.py): training and generation speed of the book presets against
the D2L reference (the benchmark itself is rnnlm.tools.bench); `rnnlm bench speedrun`: the
time from a training command's start to a held-out perplexity target (rnnlm.tools.speedrun).

speedrun is an optional sub-command rather than an option: its arguments (the configs to time,
--target) mean nothing to the preset benchmark and the preset benchmark's mean nothing to it,
so each has its own --help, and `rnnlm bench --presets ...` parses exactly as before."""

from __future__ import annotations

import argparse
from pathlib import Path

from rnnlm.tools.presets import BOOK_PRESETS

SUMMARY = "speed of the presets against D2L; speedrun: time to a target"
DESCRIPTION = """\
Training and generation speed of the book presets, side by side with the D2L reference.

For each preset: our tokens/s, the D2L reference's tokens/s measured in the same run
(`d2l_reference.sh`, when it is available), the ratio, the model's FLOPs per token, the fp32
matmul throughput measured at the model's own shapes in MKL (the roofline) and the fraction
of it we reach ("of roofline": how close we come to one library at our shapes), our matmul
GFLOP/s per core and its fraction of the core's fp32 and bf16 peak ("of fp32 peak", "of bf16
peak": how close we come to the hardware; each peak measured first, one 4096x4096 product on
one thread: MKL for fp32, oneDNN for bf16, with AMX where the CPU has it), and the final
perplexity of both after one long run each, so that speed can never come from doing less
work. Speeds come from short rounds taken in turns (ours, then the reference, --rounds
times): the machine's speed drifts, and a ratio means something only between two trainers
measured at the same moment. Then generation speed against D2L's predict_ch8.

    {prog}                       # all seven presets, 500 epochs (the book's budget)
    {prog} --epochs 30 --presets rnn_scratch gru
    {prog} --epochs 5 --variant train.precision=bf16 --variant train.compile=true

Each --variant adds, per preset, a row trained with those overrides (comma-separated), with
its speed relative to the preset's own row, measured in the same rounds, and its perplexity.

`{prog} speedrun [CONFIG ...]` times training commands to a validation perplexity
target instead: see `{prog} speedrun --help`."""
FORMATTER = argparse.RawDescriptionHelpFormatter
ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS_PAGE = ROOT / "docs" / "benchmarks.md"
SPEEDRUN = "speedrun"
# today's recipe first: the others' times are given relative to it
SPEEDRUN_RECIPES = ["configs/heldout_lstm_spaced.yaml", "configs/speedrun.yaml"]  # from ROOT
SPEEDRUN_TARGET = 3.60
SPEEDRUN_DESCRIPTION = """\
Time to a held-out target: the seconds from a training command's start to its first
validation perplexity <= --target, start-up, data loading and compilation included.

Each CONFIG runs as `python -m rnnlm train --config CONFIG --set out_dir=... [--set ...]` in
a child process; the clock starts just before it is launched, and the time to target is the
moment its metrics.jsonl receives the first epoch record with val_ppl <= the target, as this
process sees it (it reads the file every 0.1 s while the child runs). The run goes on to its
end. For each config: that time (median over the rounds, and range), the epoch of that record,
training tokens/s (median over the epochs), the achieved matmul GFLOP/s, the best validation
and the test perplexity, and the whole run's time; "not reached" when no validation got there.
With several configs they run in turns (round 1: A B; round 2: B A; ...), and each one's time
is given relative to the first config's, the ratio taken within each round (median).

Every config is checked, and its text tokenised into the token cache, before the first run.
A run that fails is reported with the end of its stderr, the others go on, and the command
exits 1.

    {prog}    # the default recipes, one round
    {prog} configs/heldout_lstm_spaced.yaml configs/speedrun.yaml --rounds 3
    {prog} configs/heldout_lstm_spaced.yaml --target 3.8 --set train.threads=2"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_preset_arguments(parser)
    # argparse would print the optional sub-command at the end of the preset benchmark's usage
    # as if it were required: the usage names the two forms instead, one line each
    presets_usage = parser.format_usage().removeprefix("usage: ").rstrip()
    modes = parser.add_subparsers(dest="mode", title="sub-command (optional)",
                                  metavar=f"{SPEEDRUN} [CONFIG ...] [options]",
                                  help="time training commands to a held-out perplexity "
                                       f"target instead (see: {SPEEDRUN} --help)")
    speedrun = modes.add_parser(SPEEDRUN, formatter_class=FORMATTER)
    speedrun.description = SPEEDRUN_DESCRIPTION.format(prog=speedrun.prog)
    add_speedrun_arguments(speedrun)
    # both as argparse wraps them: the second starts where the first's "usage: " ends
    speedrun_usage = speedrun.format_usage().removeprefix("usage: ").rstrip()
    parser.usage = f"{presets_usage}\n       {speedrun_usage}"


def add_preset_arguments(parser: argparse.ArgumentParser) -> None:
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


def add_speedrun_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("configs", nargs="*", metavar="CONFIG",
                        default=[str(ROOT / path) for path in SPEEDRUN_RECIPES],
                        help="the recipes to time (default: " + " and ".join(SPEEDRUN_RECIPES)
                             + " of this repository); the first is the one the others' times "
                             "are compared with")
    parser.add_argument("--target", type=float, default=SPEEDRUN_TARGET, metavar="PPL",
                        help=f"validation perplexity to reach (default {SPEEDRUN_TARGET:.2f})")
    parser.add_argument("--rounds", type=int, default=1,
                        help="times each config is run, in turns (default 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every run, e.g. --set train.threads=1 (repeatable)")
    parser.add_argument("--keep", metavar="DIR",
                        help="keep the runs (out_dirs NAME-roundK and their stdout and stderr) "
                             "in DIR, which must not hold runs of the same names (default: a "
                             "temporary folder, deleted)")
    parser.add_argument("--write", metavar="FILE",
                        help="also write the report into this markdown file, in its speedrun "
                             "section (the rest of the file is kept)")


def run(args: argparse.Namespace) -> int:
    if args.mode == SPEEDRUN:
        before = args.invocation.argv[:list(args.invocation.argv).index(SPEEDRUN)]
        if before:
            # argparse lets the sub-command's defaults replace what was given before it
            from rnnlm.errors import ConfigError
            raise ConfigError(f"{' '.join(before)}: the preset benchmark's options do not "
                              f"apply to speedrun; give speedrun's options after it")
        from rnnlm.tools.speedrun import speedrun

        return speedrun(args.configs, args.target, args.rounds, args.set, args.keep,
                        args.invocation.line, args.write)
    from rnnlm.tools.bench import benchmark

    return benchmark(args, args.invocation.line)
