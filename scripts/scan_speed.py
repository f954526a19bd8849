"""Training speed of the linear recurrences by parallel scan against the step-by-step loop and
against the LSTM at the same parameter count, for several window lengths, in one run.

    python scripts/scan_speed.py                           # T = 35, 128, 512, 2048; 3 rounds
    python scripts/scan_speed.py --windows 64 1024 --rounds 5 --tokens 16384
    python scripts/scan_speed.py --write docs/benchmarks.md   # also into its `scan` section

Every measurement is the trainer's own training step on the Time Machine's training split:
the preset's model, optimizer (fused AdamW), clipping, dropout and weight average, windows of
data.num_steps = T with the state carried between them (rnnlm.training.epoch.train_epoch), on
the preset's one thread. The models are the presets configs/lru.yaml, mingru.yaml and
minlstm.yaml, each run three ways (model.backward): "manual", the parallel scan with its
hand-written backward (what training runs); "autograd", the scan recorded by autograd (the
LRU's complex scan, minGRU's and minLSTM's log-space scan); "loop", the same recurrence one
step after another in Python, recorded by autograd; and configs/heldout_lstm_spaced.yaml, the
LSTM they are sized against (nn.LSTM on the project's C window loops in fp32). The windows
and the models only change between measurements, never the rest of the recipe.

Each measurement runs one warm-up batch, then batches of T steps until --tokens training
tokens have passed (at least two batches), and gives tokens/s. A round measures every model
and path at every T, in an order that alternates from round to round (as given, then
reversed), because this machine's speed drifts over minutes; the ratios (scan / loop, scan /
LSTM) are taken within each round, and the table gives the median over rounds with its range.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from rnnlm.config import load_config
from rnnlm.data.corpus import load_corpus
from rnnlm.data.iterators import BatchIterator
from rnnlm.models import build_model
from rnnlm.tools.bench import machine_line, time_training_steps, write_section
from rnnlm.training.run import make_optimizer, run_threads, seed_everything

ROOT = Path(__file__).resolve().parents[1]
LSTM = "lstm"
LSTM_CONFIG = "configs/heldout_lstm_spaced.yaml"
KINDS = ("lru", "mingru", "minlstm")  # each from configs/KIND.yaml
PATHS = ("manual", "autograd", "loop")  # model.backward; "loop" is set on the built model
WINDOWS = (35, 128, 512, 2048)
SECTION = "scan"


@dataclass(frozen=True)
class Setup:
    """One thing measured: a model (a kind's preset) run one way."""

    model: str  # "lstm" or a kind
    path: str  # "lstm" for the LSTM, else one of PATHS

    @property
    def config(self) -> Path:
        return ROOT / (LSTM_CONFIG if self.model == LSTM else f"configs/{self.model}.yaml")


def setups(kinds: tuple[str, ...] = KINDS) -> list[Setup]:
    return [Setup(LSTM, LSTM), *(Setup(kind, path) for kind in kinds for path in PATHS)]


def tokens_per_s(setup: Setup, window: int, tokens: int, sets: list[str]) -> tuple[float, int]:
    """Training tokens/s of `setup` on windows of `window` steps (see the module docstring),
    and the model's parameter count."""
    overrides = [*sets, f"data.num_steps={window}"]
    if setup.path in ("manual", "autograd"):
        overrides.append(f"model.backward={setup.path}")
    cfg = load_config(setup.config, overrides)
    seed_everything(cfg.seed)
    corpus = load_corpus(cfg.data)
    model = build_model(cfg.model, len(corpus.vocab), cfg.train)
    if setup.path == "loop":
        model.backward = "loop"  # the step-by-step reference the scans are tested against
    optimizer = make_optimizer(cfg, model)
    per_batch = cfg.data.batch_size * window
    batches = max(2, math.ceil(tokens / per_batch))
    data = BatchIterator(corpus.splits.train, cfg.data.batch_size, window, cfg.data.iterator,
                         seed=cfg.seed)
    # a long window leaves few batches in an epoch: the next epochs continue the stream
    stream = itertools.chain.from_iterable(data.epoch(e) for e in itertools.count())
    batch_list = list(itertools.islice(stream, 1 + batches))
    seconds = time_training_steps(cfg, model, optimizer, batch_list, warm=1)
    return batches * per_batch / seconds, sum(p.numel() for p in model.parameters())


def in_turns(items: list, rounds: int) -> list[list]:
    """Each round's order: as given, then reversed, and so on."""
    return [list(items) if r % 2 == 0 else list(reversed(items)) for r in range(rounds)]


def ratio_cell(num: list[float], den: list[float]) -> str:
    """The median of the ratios num[r] / den[r] taken within each round r, with their range."""
    ratios = [n / d for n, d in zip(num, den, strict=True)]
    text = f"{statistics.median(ratios):.2f}x"
    return text + (f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else "")


def speed_cell(values: list[float]) -> str:
    text = f"{statistics.median(values):,.0f}"
    return text + (f" ({min(values):,.0f}-{max(values):,.0f})" if len(values) > 1 else "")


def table(speeds: dict[tuple[Setup, int], list[float]], params: dict[str, int],
          windows: list[int], kinds: tuple[str, ...]) -> list[str]:
    """One row per window and model: tokens/s of each path (median over rounds, range), and
    the manual scan's speed against the loop and against the LSTM, ratios within rounds."""
    lines = ["| T | model | params | tokens/s: scan, manual backward (LSTM: its step) | "
             "scan, autograd | loop | scan / loop | scan / LSTM |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for window in windows:
        lstm = speeds[Setup(LSTM, LSTM), window]
        lines.append(f"| {window:,} | LSTM | {params[LSTM]:,} | {speed_cell(lstm)} | | | | |")
        for kind in kinds:
            manual, autograd, loop = (speeds[Setup(kind, path), window] for path in PATHS)
            lines.append(f"| {window:,} | {kind} | {params[kind]:,} | {speed_cell(manual)} | "
                         f"{speed_cell(autograd)} | {speed_cell(loop)} | "
                         f"{ratio_cell(manual, loop)} | {ratio_cell(manual, lstm)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", nargs="+", type=int, default=list(WINDOWS), metavar="T")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=8192,
                        help="training tokens per measurement, after a warm-up batch")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every config (tests: a small model, a data_dir)")
    parser.add_argument("--write", metavar="FILE",
                        help="also write the table into this markdown file's `scan` section")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.tokens < 1 or min(args.windows) < 1:
        parser.error("--rounds, --tokens and every window must be >= 1")
    kinds = tuple(args.kinds)
    todo = [(setup, window) for window in args.windows for setup in setups(kinds)]
    speeds: dict[tuple[Setup, int], list[float]] = {key: [] for key in todo}
    params: dict[str, int] = {}
    for k, order in enumerate(in_turns(todo, args.rounds), 1):
        for setup, window in order:
            speed, params[setup.model] = tokens_per_s(setup, window, args.tokens, args.set)
            speeds[setup, window].append(speed)
            print(f"round {k}: T={window} {setup.model} {setup.path}: {speed:,.0f} tokens/s",
                  file=sys.stderr, flush=True)
    command = " ".join(["python scripts/scan_speed.py", *(argv if argv is not None
                                                         else sys.argv[1:])])
    with run_threads(1, 1):  # the presets' train.threads, under which everything ran
        machine = machine_line("cpu")
    head = [f"Machine: {machine}.",
            f"Command: `{command}` (training tokens/s of a real training step, forward, "
            f"backward, clipping, optimizer and weight average, one thread as the presets "
            f"run; {args.tokens:,} tokens per measurement after a warm-up batch; median over "
            f"{args.rounds} rounds taken in turns (range); ratios taken within rounds).", ""]
    text = "\n".join([*head, *table(speeds, params, args.windows, kinds)])
    print(text)
    if args.write:
        write_section(Path(args.write), SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
