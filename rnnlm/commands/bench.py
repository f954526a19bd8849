"""`rnnlm bench` (and bench.py): training and generation speed of the book presets against
the D2L reference (the benchmark itself is rnnlm.tools.bench); `rnnlm bench speedrun`: the
time from a training command's start to a held-out perplexity target (rnnlm.tools.speedrun);
`rnnlm bench probe`: held-out recall accuracy after a gap of K characters, per model kind
(rnnlm.tools.probe).

speedrun and probe are optional sub-commands rather than options: their arguments (the configs
to time, --target; the kinds and gaps) mean nothing to the preset benchmark and the preset
benchmark's mean nothing to them, so each has its own --help, and `rnnlm bench --presets ...`
parses exactly as before."""

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
target instead: see `{prog} speedrun --help`. `{prog} probe` measures how far back each
model kind recalls a character: see `{prog} probe --help`."""
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
    {prog} configs/heldout_lstm_spaced.yaml --target 3.8 --set train.threads=2
    {prog} configs/heldout_lstm_spaced.yaml configs/lru.yaml --budget 600

With --budget SECONDS the recipes get equal wall time instead: each run is stopped (SIGTERM;
the trainer saves last.pt and exits) when its clock passes SECONDS, and the table gives, from
the records written within the budget, the epochs completed, the best validation perplexity
and its epoch, and the test perplexity of those weights (the trainer's own test record when it
scored them, else best.pt scored after the stop when it holds them, else n/a)."""

PROBE = "probe"
# the defaults of rnnlm.tools.probe, repeated here because this module may not import torch
PROBE_KINDS = ["rnn", "lstm", "gru", "lru", "mingru"]
PROBE_GAPS = [10, 30, 100, 300, 1000, 3000]
PROBE_DESCRIPTION = """\
A long-dependency probe: held-out recall accuracy after a gap of K characters, for each model
kind, with the same window length, the same training tokens and about the same parameter count.

The text is one segment per line: a key (one of a-h), K random digits, "?", the key again
("c8274019?c" for K = 7). Only the character after "?" depends on the past, and only on the
key K + 1 steps back; the score is how often the model's most likely character there is the
key (chance 1/8). For each K, every kind trains once through the normal trainer on a freshly
generated text of --tokens characters (one pass, sequential iteration, the state carried
from window to window and truncated at every window boundary, --window steps), and is scored
on --recalls held-out segments from another seed. From K = window - 1 on, no gradient ever
connects a recall to its key: the carried state is the only bridge.

    {prog}                       # the five kinds, K = 10 ... 3,000: 10-15 minutes
    {prog} --kinds lstm lru --gaps 10 100 1000 --tokens 300000
    {prog} --write docs/probe.md --plot docs/probe.png --set train.lr=0.001

Prints a markdown table (accuracy per kind and K, width, parameters, seconds per run); exits 1
when a run diverged (its cells say so), 2 on bad input."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_preset_arguments(parser)
    # argparse would print the optional sub-command at the end of the preset benchmark's usage
    # as if it were required: the usage names each form instead, one line each
    presets_usage = parser.format_usage().removeprefix("usage: ").rstrip()
    modes = parser.add_subparsers(dest="mode", title="sub-commands (optional)",
                                  metavar=f"{{{SPEEDRUN},{PROBE}}} ...")
    speedrun = modes.add_parser(SPEEDRUN, formatter_class=FORMATTER,
                                help="time training commands to a held-out perplexity "
                                     f"target instead (see: {SPEEDRUN} --help)")
    speedrun.description = SPEEDRUN_DESCRIPTION.format(prog=speedrun.prog)
    add_speedrun_arguments(speedrun)
    probe = modes.add_parser(PROBE, formatter_class=FORMATTER,
                             help="held-out recall accuracy after a gap of K characters, per "
                                  f"model kind (see: {PROBE} --help)")
    probe.description = PROBE_DESCRIPTION.format(prog=probe.prog)
    add_probe_arguments(probe)
    # each as argparse wraps it: the later ones start where the first's "usage: " ends
    usages = [sub.format_usage().removeprefix("usage: ").rstrip() for sub in (speedrun, probe)]
    parser.usage = "\n       ".join([presets_usage, *usages])


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
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help="equal wall time: stop every run when its clock (from its launch) "
                             "passes SECONDS, and report what it reached within them: epochs, "
                             "best validation perplexity, the test perplexity of those weights")
    parser.add_argument("--write", metavar="FILE",
                        help="also write the report into this markdown file, in its speedrun "
                             "section (the rest of the file is kept)")


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kinds", nargs="+", default=PROBE_KINDS, metavar="KIND",
                        help="model kinds to train (default: " + " ".join(PROBE_KINDS) + ")")
    parser.add_argument("--gaps", nargs="+", type=int, default=PROBE_GAPS, metavar="K",
                        help="gaps: filler characters between key and marker (default: "
                             + " ".join(map(str, PROBE_GAPS)) + ")")
    parser.add_argument("--tokens", type=int, default=1_200_000, metavar="N",
                        help="training characters per run, every kind and gap: the budget "
                             "(default 1,200,000; one pass)")
    parser.add_argument("--window", type=int, default=64, metavar="T",
                        help="window length data.num_steps, every kind (default 64)")
    parser.add_argument("--params", type=int, default=150_000, metavar="P",
                        help="each kind's width is chosen for the parameter count closest to "
                             "this (default 150,000)")
    parser.add_argument("--recalls", type=int, default=200, metavar="R",
                        help="held-out recalls (segments) scored per gap (default 200)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the texts and of every run (default 0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change the training recipe for every run, e.g. --set "
                             "train.lr=0.001 (repeatable)")
    parser.add_argument("--write", metavar="FILE",
                        help="also write the report into this markdown file, in its probe "
                             "section (the rest of the file is kept)")
    parser.add_argument("--plot", metavar="FILE",
                        help="draw accuracy against K (one line per kind) into this PNG file")


def run(args: argparse.Namespace) -> int:
    if args.mode in (SPEEDRUN, PROBE):
        before = args.invocation.argv[:list(args.invocation.argv).index(args.mode)]
        if before:
            # argparse lets the sub-command's defaults replace what was given before it
            from rnnlm.errors import ConfigError
            raise ConfigError(f"{' '.join(before)}: the preset benchmark's options do not "
                              f"apply to {args.mode}; give {args.mode}'s options after it")
    if args.mode == PROBE:
        from rnnlm.tools.probe import Options, probe

        options = Options(kinds=tuple(args.kinds), gaps=tuple(args.gaps), tokens=args.tokens,
                          window=args.window, params=args.params, recalls=args.recalls,
                          seed=args.seed, sets=tuple(args.set))
        return probe(options, args.invocation.line, args.write, args.plot)
    if args.mode == SPEEDRUN:
        from rnnlm.tools.speedrun import speedrun

        return speedrun(args.configs, args.target, args.rounds, args.set, args.keep,
                        args.invocation.line, args.write, args.budget)
    from rnnlm.tools.bench import benchmark

    return benchmark(args, args.invocation.line)
