"""The long-dependency probe (`rnnlm bench probe`): held-out recall accuracy after a gap of K
characters, for several model kinds trained the same way on the same synthetic text.

The task. The text is a stream of segments, one per line:

    KEY  K filler characters  MARKER  KEY  newline          e.g.  c8274019?c   (K = 7)

KEY is one of KEYS, drawn uniformly and independently for each segment; the filler is K
characters drawn uniformly from FILLER (random, so a model can neither compress it nor learn
where it is by its content; disjoint from KEYS, so the key is the segment's only key
character before the recall); MARKER says "recall now". The character after the marker (the
recall) is the only one in the stream that depends on anything before the segment's first
character: a model predicts it above chance only by carrying the key across the K filler
steps. The recall is
what is scored: at those positions only, the model's most likely next character (argmax over
the whole vocabulary) must be the key. A model that knows the format but not the key gets
1 / len(KEYS) (`CHANCE`).

Truncation made visible. Every kind trains through the normal trainer (rnnlm.training.run:
the same loop as `rnnlm train`) with sequential iteration, its state carried from window to
window and detached at every window boundary (D2L's regular truncation), with the same window
length T for every kind. The loss at a recall is computed at the step whose input is the
marker, K + 1 steps after the key's; a gradient from it reaches the key's step only when both
lie in one window, which happens for a fraction max(0, T - K - 1) / T of the recalls
(`gradient_share`): 83% at K = 10 and 52% at K = 30 with T = 64, none from K = T - 1 on. Past
that, the carried state is the only bridge, and nothing tells the model to build it: what a
kind recalls there, it recalls because its state keeps the key without being trained to
(long time constants by construction, as the LRU's |lambda| close to 1), not because
backpropagation through time taught it to.

Data and seeds. For each K, the training text is one file of --tokens characters (whole
segments; one pass, train.epochs = 1, so no segment is seen twice) and the held-out text
--recalls further segments, both generated deterministically from --seed and K, from two
different generators (`stream_rng`). The training file opens with one line listing the
alphabet, so that the vocabulary the trainer builds from the text (raw preprocessing) holds
every character even when a short text happens to miss one; nothing is scored there.

The same budget for every kind: the same training tokens (--tokens, one pass) rather than the
same wall time, because the question is what each recurrence can learn from a given amount of
evidence, and because times on a shared machine drift by tens of percent where token counts
do not; the table gives each kind's training seconds per run beside it. The same size as far
as a width allows: each kind's model.hidden_size is the one whose parameter count is closest
to --params (`width_for`), and the table gives the count. The recipe (PROBE_CONFIG: Adam,
learning rate 0.002, clipping at 1, 16 lanes) is the same for all; `--set KEY=VALUE` changes
it for all, except the keys the probe sets itself (PROBE_KEYS).

Held-out accuracy (`recall_accuracy`) carries the state through the held-out stream as held-out
evaluation does (rnnlm.evaluation.evaluate), read in EVAL_LANES lanes of whole segments, each
started from a zero state at a segment's first character.
"""

from __future__ import annotations

import io
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rnnlm.checkpoint import load_checkpoint, model_from_checkpoint
from rnnlm.config import Config, ConfigError, ModelConfig, config_from_dict, parse_override
from rnnlm.config.checks import resolve_device
from rnnlm.data.corpus import UNK
from rnnlm.evaluation.evaluate import EVAL_WINDOW
from rnnlm.files import ensure_directory, write_atomic
from rnnlm.models import MODEL_KINDS, LanguageModel, build_model
from rnnlm.tools.bench import machine_line, write_section
from rnnlm.training.divergence import TrainingDiverged
from rnnlm.training.metrics import read_records
from rnnlm.training.run import run_threads, train

KEYS = "abcdefgh"  # what is recalled: chance is 1 / 8
FILLER = "0123456789"  # what fills the gap
MARKER = "?"  # "the key comes next"
END = "\n"  # one segment per line
ALPHABET = KEYS + FILLER + MARKER
CHANCE = 1 / len(KEYS)
EXTRA_PER_SEGMENT = 4  # key, marker, recalled key, newline: a segment is K + 4 characters
EVAL_LANES = 16  # held-out lanes (whole segments each): only the speed of evaluation moves

DEFAULT_KINDS = ("rnn", "lstm", "gru", "lru", "mingru")
DEFAULT_GAPS = (10, 30, 100, 300, 1000, 3000)
DEFAULT_TOKENS = 1_200_000
DEFAULT_WINDOW = 64
DEFAULT_PARAMS = 150_000
DEFAULT_RECALLS = 200
MIN_TRAIN_SEGMENTS = 8  # fewer recalls than this in a training text teach nothing

#: The recipe every kind trains with (the keys the probe sets per run are placeholders here).
PROBE_CONFIG: dict = {
    "seed": 0,
    "device": "auto",
    "out_dir": "runs/probe",
    "data": {"path": None, "preprocess": "raw", "cache": False, "max_tokens": None,
             "split": None, "iterator": "sequential", "batch_size": 16,
             "num_steps": DEFAULT_WINDOW},
    "model": {"kind": "lstm", "hidden_size": 128, "num_layers": 1},
    # one thread: the small models gain little from a second one, and runs stay comparable
    "train": {"epochs": 1, "optimizer": "adam", "lr": 0.002, "clip_norm": 1.0, "threads": 1,
              "prefix": KEYS[0], "predict_every": 0, "predict_chars": 20,
              "checkpoint_every": 0},
}
#: Keys each run gets from the probe's own options (or from the probe itself), so `--set`
#: may not give them: the option that sets each one, or None where no option does.
PROBE_KEYS: dict[str, str | None] = {
    "seed": "--seed", "out_dir": None, "data.path": None, "data.preprocess": None,
    "data.max_tokens": None, "data.split": None, "data.cache": None, "data.num_steps": "--window",
    "model.kind": "--kinds", "model.hidden_size": "--params", "train.epochs": "--tokens",
}


# ---------------------------------------------------------------------------- the text


@dataclass(frozen=True)
class Stream:
    """Generated text and where its recalls are: `recalls[i]` is the index in `text` of segment
    i's recalled key; segment i occupies `starts[i]` to `starts[i] + gap + 4`."""

    text: str
    gap: int
    starts: np.ndarray
    recalls: np.ndarray

    @property
    def keys(self) -> str:
        return "".join(self.text[i] for i in self.recalls)


PARTS = {"train": 0, "heldout": 1}


def stream_rng(seed: int, gap: int, part: str) -> np.random.Generator:
    """The generator of one text: training and held-out text never share one."""
    return np.random.default_rng([seed, gap, PARTS[part]])


def make_stream(gap: int, segments: int, seed: int, part: str,
                header: bool = False) -> Stream:
    """`segments` segments with `gap` filler characters each (module docstring), from
    stream_rng(seed, gap, part); with `header`, after a first line that lists ALPHABET."""
    if gap < 1 or segments < 1:
        raise ValueError(f"need gap >= 1 and segments >= 1, got {gap} and {segments}")
    rng = stream_rng(seed, gap, part)
    keys = np.frombuffer(KEYS.encode("utf-32-le"), np.uint32)
    filler = np.frombuffer(FILLER.encode("utf-32-le"), np.uint32)
    width = gap + EXTRA_PER_SEGMENT
    drawn = keys[rng.integers(0, len(keys), segments)]
    grid = np.empty((segments, width), np.uint32)
    grid[:, 0] = drawn
    grid[:, 1: gap + 1] = filler[rng.integers(0, len(filler), (segments, gap))]
    grid[:, gap + 1] = ord(MARKER)
    grid[:, gap + 2] = drawn
    grid[:, gap + 3] = ord(END)
    head = ALPHABET + END if header else ""
    text = head + grid.tobytes().decode("utf-32-le")
    starts = len(head) + width * np.arange(segments)
    return Stream(text, gap, starts, starts + gap + 2)


def segment_count(tokens: int, gap: int) -> int:
    """Whole segments in a training text of about `tokens` characters."""
    return tokens // (gap + EXTRA_PER_SEGMENT)


def gradient_share(gap: int, window: int) -> float:
    """The fraction of recalls whose loss reaches the key's step by backpropagation within a
    window: both steps (gap + 1 apart) in one window of `window` steps, over the alignments
    of the segment against the window boundaries."""
    return max(0, window - gap - 1) / window


# ---------------------------------------------------------------------------- the score


@dataclass(frozen=True)
class Lane:
    """One held-out lane: token ids, and the indices in them of the recalled keys."""

    ids: np.ndarray
    recalls: np.ndarray


@dataclass(frozen=True)
class Recall:
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


def heldout_lanes(stream: Stream, encode, lanes: int) -> list[Lane]:
    """The stream in up to `lanes` contiguous lanes of whole segments (as even as can be),
    each lane's text encoded by `encode` (str -> ids)."""
    parts = [p for p in np.array_split(np.arange(len(stream.starts)), lanes) if len(p)]
    out = []
    for part in parts:
        begin = int(stream.starts[part[0]])
        end = int(stream.starts[part[-1]]) + stream.gap + EXTRA_PER_SEGMENT
        out.append(Lane(np.asarray(encode(stream.text[begin:end]), np.int64),
                        stream.recalls[part] - begin))
    return out


@torch.no_grad()
def recall_accuracy(model: LanguageModel, lanes: Sequence[Lane],
                    window: int = EVAL_WINDOW) -> Recall:
    """How often the model's most likely next token is the recalled key, at the recall
    positions only. The lanes run side by side, `window` steps per call, each from a zero
    state carried to its end (a shorter lane is padded after its end, where nothing is
    scored); the prediction of token j comes from the step whose input is token j - 1."""
    device = next(model.parameters()).device
    length = max(len(lane.ids) for lane in lanes)
    ids = np.zeros((len(lanes), length), np.int64)
    for k, lane in enumerate(lanes):
        ids[k, : len(lane.ids)] = lane.ids
    guesses = np.zeros((len(lanes), length), np.int64)  # guesses[:, j]: for token j
    was_training = model.training
    model.eval()
    try:
        state = model.begin_state(len(lanes))
        for s in range(0, length - 1, window):
            x = torch.from_numpy(ids[:, s: min(s + window, length - 1)]).to(device)
            logits, state = model(x, state)  # (w, lanes, V)
            guesses[:, s + 1: s + 1 + x.shape[1]] = logits.argmax(-1).t().cpu().numpy()
    finally:
        model.train(was_training)
    correct = total = 0
    for k, lane in enumerate(lanes):
        if len(lane.recalls) and lane.recalls.min() < 1:
            raise ValueError("a recall at a lane's first token has no input to predict it from")
        correct += int((guesses[k, lane.recalls] == lane.ids[lane.recalls]).sum())
        total += len(lane.recalls)
    return Recall(correct, total)


# ---------------------------------------------------------------------------- the models


def vocab_size() -> int:
    """The vocabulary the trainer builds from a probe text: <unk>, the alphabet, newline."""
    return len({UNK, *ALPHABET, END})


def parameter_count(model_cfg: ModelConfig, vocab: int) -> int:
    return sum(p.numel() for p in build_model(model_cfg, vocab).parameters())


def width_for(model_cfg: ModelConfig, vocab: int, target: int) -> tuple[int, int]:
    """The model.hidden_size (and its parameter count) closest to `target` parameters for
    model_cfg's kind and other settings: counts grow with the width, so a bisection finds the
    two widths around the target."""
    def count(width: int) -> int:
        return parameter_count(replace(model_cfg, hidden_size=width), vocab)

    low, high = 1, 2
    while count(high) < target:
        low, high = high, high * 2
        if high > 1 << 16:
            raise ConfigError(f"--params {target:,} needs a {model_cfg.kind} wider than "
                              f"{high:,}: give a smaller --params")
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if count(middle) < target else (low, middle)
    return min(((w, count(w)) for w in (low, high)), key=lambda wc: abs(wc[1] - target))


# ---------------------------------------------------------------------------- the runs


@dataclass(frozen=True)
class Options:
    """What `rnnlm bench probe` was asked: its options, one field each (sets: the --set
    items, applied to every run)."""

    kinds: tuple[str, ...] = DEFAULT_KINDS
    gaps: tuple[int, ...] = DEFAULT_GAPS
    tokens: int = DEFAULT_TOKENS
    window: int = DEFAULT_WINDOW
    params: int = DEFAULT_PARAMS
    recalls: int = DEFAULT_RECALLS
    seed: int = 0
    sets: tuple[str, ...] = ()


@dataclass
class Sized:
    """One kind as it is trained: its width and parameter count at --params."""

    kind: str
    width: int
    params: int


@dataclass
class Result:
    """One kind trained and scored on one gap."""

    kind: str
    gap: int
    recall: Recall | None = None  # None: the run diverged
    wall_s: float = 0.0  # the training run, from its start to last.pt
    tokens: int = 0  # training tokens the run consumed (metrics.jsonl)
    train_bpc: float | None = None
    error: str | None = None


@dataclass
class Probe:
    options: Options
    sized: list[Sized]
    results: list[Result] = field(default_factory=list)
    machine: str = ""
    threads: int | None = None


def check_options(options: Options) -> None:
    """Every option before anything trains: one line naming what is wrong."""
    unknown = [k for k in options.kinds if k not in MODEL_KINDS]
    if unknown:
        raise ConfigError(f"--kinds: unknown kind {unknown[0]!r}; choose from "
                          f"{', '.join(MODEL_KINDS)}")
    for name, values in (("--kinds", options.kinds), ("--gaps", options.gaps)):
        if not values:
            raise ConfigError(f"{name} needs at least one value")
        if len(set(values)) != len(values):
            raise ConfigError(f"{name} repeats a value: give each once")
    if min(options.gaps) < 1:
        raise ConfigError(f"--gaps must all be >= 1 filler characters, got {min(options.gaps)}")
    for name, value, least in (("--window", options.window, 2), ("--params", options.params, 1),
                               ("--recalls", options.recalls, 1)):
        if value < least:
            raise ConfigError(f"{name} must be >= {least}, got {value}")
    longest = max(options.gaps)
    need = MIN_TRAIN_SEGMENTS * (longest + EXTRA_PER_SEGMENT)
    if options.tokens < need:
        raise ConfigError(f"--tokens {options.tokens:,} holds fewer than {MIN_TRAIN_SEGMENTS} "
                          f"segments of the gap {longest:,}: give --tokens >= {need:,} or "
                          f"smaller --gaps")
    for item in options.sets:
        key = parse_override(item)[0]
        owned = [k for k in PROBE_KEYS if k == key or k.startswith(key + ".")]
        if owned:
            option = PROBE_KEYS[owned[0]]
            instead = f"use {option}" if option else "the probe sets it for every run"
            raise ConfigError(f"--set {key}: {instead}")


def run_config(options: Options, kind: str, width: int, text: Path | None,
               out_dir: Path) -> Config:
    """The checked config of one run (text None: a stand-in path, for the checks alone)."""
    sets = [*options.sets, f"seed={options.seed}", f"model.kind={kind}",
            f"model.hidden_size={width}", f"data.num_steps={options.window}",
            f"out_dir={out_dir}", *([f"data.path={text}"] if text is not None else [])]
    return config_from_dict(PROBE_CONFIG, sets, source="the probe's recipe")


def size_kinds(options: Options) -> list[Sized]:
    sized = []
    for kind in options.kinds:
        cfg = run_config(options, kind, 1, None, Path("unused"))
        width, params = width_for(cfg.model, vocab_size(), options.params)
        sized.append(Sized(kind, width, params))
    return sized


def train_one(options: Options, sized: Sized, text: Path, out_dir: Path,
              heldout: Stream) -> Result:
    """Train one kind on one gap's text through the trainer, then score its last.pt."""
    cfg = run_config(options, sized.kind, sized.width, text, out_dir)
    result = Result(sized.kind, heldout.gap)
    start = time.perf_counter()
    try:
        train(cfg, quiet=True, out=io.StringIO(), progress=False)
    except TrainingDiverged as diverged:
        result.error = "diverged"
        result.wall_s = time.perf_counter() - start
        print(f"    {sized.kind} at K={heldout.gap:,}: {diverged}", file=sys.stderr)
        return result
    result.wall_s = time.perf_counter() - start
    epochs = [r for r in read_records(out_dir) if "train_loss" in r]
    result.tokens = sum(r.get("tokens", 0) for r in epochs)
    result.train_bpc = epochs[-1]["train_bpc"] if epochs else None
    path = out_dir / "last.pt"
    model, vocab, _, _ = model_from_checkpoint(load_checkpoint(path),
                                               resolve_device(cfg.device), str(path))
    with run_threads(cfg.train.threads, 1):
        result.recall = recall_accuracy(model, heldout_lanes(heldout, vocab.encode, EVAL_LANES))
    return result


def run_probe(options: Options, root: Path, progress=None) -> Probe:
    """Every kind on every gap (gaps outer, so each gap's row fills in turn), in `root`; a
    line per run on `progress` (default: stderr)."""
    check_options(options)
    progress = progress or sys.stderr
    probe = Probe(options, size_kinds(options))
    first = run_config(options, options.kinds[0], 1, None, root)
    probe.threads = first.train.threads
    with run_threads(first.train.threads, 1):  # the threads the runs train with
        probe.machine = machine_line(resolve_device(first.device).type)
    runs, done = len(options.kinds) * len(options.gaps), 0
    for gap in options.gaps:
        folder = root / f"gap{gap}"
        ensure_directory(folder)
        text = folder / "train.txt"
        training = make_stream(gap, segment_count(options.tokens, gap), options.seed, "train",
                               header=True)
        write_atomic(text, training.text)
        heldout = make_stream(gap, options.recalls, options.seed, "heldout")
        for sized in probe.sized:
            done += 1
            result = train_one(options, sized, text, folder / sized.kind, heldout)
            probe.results.append(result)
            print(f"[{done}/{runs}] K={gap:,} {sized.kind} (width {sized.width}): "
                  f"{describe(result)}", file=progress, flush=True)
    return probe


def describe(result: Result) -> str:
    if result.recall is None:
        return result.error or "failed"
    r = result.recall
    bpc = "" if result.train_bpc is None else f", train bpc {result.train_bpc:.3f}"
    return (f"recall {r.accuracy:.3f} ({r.correct}/{r.total}){bpc}, {result.tokens:,} tokens "
            f"in {result.wall_s:.1f} s")


# ---------------------------------------------------------------------------- the report


def report(probe: Probe, command: str) -> str:
    """The settings, one row per kind (accuracy per gap, width, parameters, training time)."""
    o = probe.options
    gaps = " | ".join(f"K={g:,}" for g in o.gaps)
    lines = [f"| kind | width | params | {gaps} | train s/run |",
             "|---|---:|---:|" + "---:|" * len(o.gaps) + "---:|"]
    for sized in probe.sized:
        mine = {r.gap: r for r in probe.results if r.kind == sized.kind}
        cells = [f"{mine[g].recall.accuracy:.3f}" if mine[g].recall else mine[g].error or "–"
                 for g in o.gaps]
        seconds = statistics.median(r.wall_s for r in mine.values())
        lines.append(f"| {sized.kind} | {sized.width} | {sized.params:,} | "
                     f"{' | '.join(cells)} | {seconds:.1f} |")
    shares = ", ".join(f"K={g:,} {gradient_share(g, o.window):.0%}" for g in o.gaps)
    tokens = sorted({r.tokens for r in probe.results if r.recall})
    trained = (f"{tokens[0]:,}" if len(tokens) == 1 else
               f"{tokens[0]:,}-{tokens[-1]:,}") if tokens else "n/a"
    extra = "".join(f" --set {s}" for s in o.sets)
    return "\n".join([
        f"Machine: {probe.machine}.",
        f"Command: `{command.strip()}`.",
        "",
        *lines,
        "",
        f"Held-out recall accuracy (argmax at the recall positions == key) over {o.recalls} "
        f"recalls per gap; chance 1/{len(KEYS)} = {CHANCE:.3f}. Every run: window T = "
        f"{o.window}, sequential iteration with the state carried, {o.tokens:,} training "
        f"characters in one pass ({trained} tokens trained after the iterator's offset and "
        f"tail), width chosen for about {o.params:,} parameters, seed {o.seed}, "
        f"{probe.threads or 'default'} thread(s){extra}. Recalls whose key lies in the same "
        f"training window (a gradient can reach it): {shares}.",
    ])


def plot(probe: Probe, path: Path) -> None:
    """Accuracy against K (log axis), one line per kind, chance and the window marked."""
    o = probe.options
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    for sized in probe.sized:
        points = [(r.gap, r.recall.accuracy) for r in probe.results
                  if r.kind == sized.kind and r.recall is not None]
        if points:
            ax.plot(*zip(*sorted(points)), "o-", markersize=4,
                    label=f"{sized.kind} ({sized.params / 1000:.0f}k)")
    ax.axhline(CHANCE, color="grey", linestyle="--", linewidth=1,
               label=f"chance 1/{len(KEYS)}")
    ax.axvline(o.window - 1, color="black", linestyle=":", linewidth=1,
               label=f"K = T - 1 = {o.window - 1}: no gradient")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("gap K (filler characters between key and marker)")
    ax.set_ylabel("held-out recall accuracy")
    ax.set_title(f"Recall after K steps, window T = {o.window}, {o.tokens:,} training tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    path = Path(path)
    ensure_directory(path.parent)
    FigureCanvasAgg(fig)
    write_atomic(path, lambda f: fig.savefig(f, dpi=110, format="png"))


def probe(options: Options, command: str, write: str | None = None,
          plot_to: str | None = None) -> int:
    """Run the probe (in a temporary folder), print the report, write it into `write` (its
    `probe` section) and the figure into `plot_to` when given; 1 when a run diverged."""
    check_options(options)
    with tempfile.TemporaryDirectory(prefix="rnnlm-probe-") as tmp:
        result = run_probe(options, Path(tmp))
    text = report(result, command)
    print(text)
    if write:
        write_section(Path(write), "probe", text)
    if plot_to:
        plot(result, Path(plot_to))
    return 1 if any(r.recall is None for r in result.results) else 0
