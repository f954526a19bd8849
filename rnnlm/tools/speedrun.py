"""Time to a held-out target (`rnnlm bench speedrun`): how long a training command takes, from
its start, to its first validation perplexity at or under a target.

What a user waits for is the whole command, not an epoch: interpreter start-up, imports, data
loading, compilation, training and the evaluations in between. So each recipe (a config) runs
as the real command, `python -m rnnlm train --config X --set out_dir=...`, in a child
process; the clock starts just before it is launched. The parent tails the child's
out_dir/metrics.jsonl while it runs (`MetricsTail`: every POLL_S seconds, complete lines
only) and stamps each record with the moment it first saw it; the time to target is the stamp
of the first epoch record whose val_ppl is <= the target (`summarise`). The run goes on to its
end, for its best validation and test perplexity and its whole wall time.

With a budget (`--budget SECONDS`) every recipe gets the same wall time instead: a child still
running when its clock passes the budget is stopped (SIGTERM: the trainer finishes its batch,
saves last.pt and exits), and only the records stamped within the budget count
(`summarise`'s `budget`): the epochs reached, the best validation perplexity, the time to
target. The test perplexity reported is that of the weights with the best validation within
the budget (`budget_test`): the trainer's own test record when it scored those weights, else
best.pt scored here on the test split when best.pt holds them, else none.

Several recipes run in turns, round after round, in alternating order (`round_order`: A B,
then B A, ...), because this machine's speed drifts over minutes; each recipe's time relative
to the first recipe's is taken within each round and the median reported (`report`).
`speedrun` does it all; the rnnlm bench command (rnnlm.commands.bench) calls it.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rnnlm.config import Config, ConfigError, load_config
from rnnlm.data.corpus import load_corpus
from rnnlm.files import ensure_directory
from rnnlm.models import MODEL_KINDS
from rnnlm.models.linear_recurrent import LinearRecurrentLM
from rnnlm.tools.bench import flops_per_token, machine_line, median_or_none, write_section
from rnnlm.tools.compare import STOP_GRACE_S, stop_child

# The folder that holds this rnnlm package: the child runs `python -m rnnlm train` with it on
# its path, so it times this very code, from a checkout or from an installed package.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]
POLL_S = 0.1  # how often the parent reads metrics.jsonl: the resolution of the time to target
STDERR_TAIL = 10  # lines of a failed child's stderr that are shown


@dataclass
class Recipe:
    """A config to time, under its name in the table (the file's stem, made unique)."""

    name: str
    config: str
    flops_per_token: float | None = None  # matmul FLOPs of one training token, when known


@dataclass
class Timing:
    """One run of one recipe: the parent's clock (seconds from launch) and the records."""

    recipe: str
    round: int  # from 1
    out_dir: Path
    wall_s: float | None = None  # launch to exit
    reached_s: float | None = None  # launch to the first record at or under the target
    reached_epoch: int | None = None
    tokens_per_s: float | None = None  # median over the epochs
    best_val_ppl: float | None = None
    test_ppl: float | None = None
    epochs: int = 0
    best_epoch: int | None = None  # the epoch of best_val_ppl
    stopped_s: float | None = None  # when the budget stopped it (None: it ended by itself)
    error: str | None = None  # one line, when the child failed
    stamped: list[tuple[float, dict]] = field(default_factory=list, repr=False)


class MetricsTail:
    """The records of a metrics.jsonl that another process appends to, each with the time at
    which `poll` first read it. Only complete lines count: the trainer writes a record and its
    newline in one append, so bytes after the last newline are a record still being written
    (or one a killed process left cut short) and wait for the next poll."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0  # bytes of the file already read
        self.partial = b""  # the start of a line whose end has not been written yet
        self.stamped: list[tuple[float, dict]] = []

    def poll(self, now: float) -> list[tuple[float, dict]]:
        """Read what was appended since the last poll; its complete records, stamped `now`."""
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size < self.offset:  # started afresh: read it anew
                    self.offset, self.partial, self.stamped = 0, b"", []
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:  # the child has not created it yet
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        new = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:  # a blank line; the trainer writes no other kind
                continue
            if isinstance(record, dict):
                new.append((now, record))
        self.stamped += new
        return new


def summarise(stamped: list[tuple[float, dict]], target: float,
              budget: float | None = None) -> dict:
    """What the stamped records of one run say: when and at which epoch the validation
    perplexity first reached `target` (None: never), the median training tokens/s over the
    epochs, the best validation perplexity and its epoch, the test perplexity, the number of
    epochs. With a `budget`, only the epoch records stamped at or before it count, and the
    test perplexity is given only when the trainer's test record scored the weights of the
    best validation within the budget (the caller may find them in best.pt instead)."""
    epochs = [(t, r) for t, r in stamped if "epoch" in r and r.get("event") is None
              and (budget is None or t <= budget)]
    reached = next(((t, r["epoch"]) for t, r in epochs
                    if r.get("val_ppl") is not None and r["val_ppl"] <= target), (None, None))
    validated = [(r["val_ppl"], r["epoch"]) for _, r in epochs if r.get("val_ppl") is not None]
    best = min(validated, key=lambda v: v[0]) if validated else (None, None)
    tests = [r for _, r in stamped if r.get("event") == "test"]
    if budget is not None:  # a test of other weights than the best within the budget: none
        tests = [r for r in tests if r.get("weights_epoch") == best[1]]
    return {"reached_s": reached[0], "reached_epoch": reached[1],
            "tokens_per_s": median_or_none([r.get("tokens_per_s") for _, r in epochs]),
            "best_val_ppl": best[0], "best_epoch": best[1],
            "test_ppl": tests[-1]["test_ppl"] if tests else None, "epochs": len(epochs)}


def train_command(config: str, out_dir: Path, sets: list[str]) -> list[str]:
    """The training command a recipe is timed with, as a user would type it."""
    cmd = [sys.executable, "-m", "rnnlm", "train", "--config", str(config),
           "--set", f"out_dir={out_dir}"]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def time_run(recipe: Recipe, round_no: int, out_dir: Path, sets: list[str], target: float,
             budget: float | None = None, poll_s: float = POLL_S) -> Timing:
    """Run one recipe's training command to its end, or until `budget` seconds from its
    launch, and time it (see the module docstring). Its stdout and stderr go to files beside
    out_dir (NAME.stdout, NAME.stderr)."""
    timing = Timing(recipe.name, round_no, out_dir)
    tail = MetricsTail(out_dir / "metrics.jsonl")
    path = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")]))
    stdout_path, stderr_path = (out_dir.with_name(f"{out_dir.name}.{s}")
                                for s in ("stdout", "stderr"))
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        start = time.perf_counter()
        child = subprocess.Popen(train_command(recipe.config, out_dir, sets), stdout=out,
                                 stderr=err, env={**os.environ, "PYTHONPATH": path})
        try:
            while True:
                try:
                    child.wait(timeout=poll_s)  # returns as soon as the child exits
                    exited = True
                except subprocess.TimeoutExpired:
                    exited = False
                now = time.perf_counter() - start
                tail.poll(now)  # after the exit too: the last records it wrote
                if exited:
                    break
                if budget is not None and now > budget and timing.stopped_s is None:
                    # SIGTERM: the trainer saves last.pt and exits; the loop goes on reading
                    # until it has, and the records written from now on do not count
                    timing.stopped_s = now
                    child.terminate()
                elif timing.stopped_s is not None and now > timing.stopped_s + STOP_GRACE_S:
                    child.kill()  # a batch or a save that takes this long will not end
        except KeyboardInterrupt:
            stop_child(child, terminate=False)  # it got the Ctrl-C too and is saving last.pt
            raise
    timing.wall_s, timing.stamped = now, tail.stamped
    for key, value in summarise(tail.stamped, target, budget).items():
        setattr(timing, key, value)
    # stopped by the budget, the trainer exits 128 + SIGTERM: not a failure
    stopped_as_asked = timing.stopped_s is not None and child.returncode in (0, -15, 143)
    if child.returncode != 0 and not stopped_as_asked:
        lines = [line for line in stderr_path.read_text(errors="replace").splitlines()
                 if line.strip()]
        timing.error = f"exit {child.returncode}: {lines[-1] if lines else 'no message'}"
        if len(lines) > 1:  # a traceback: its last lines, above the one-line summary
            print("\n".join("    " + line for line in lines[-STDERR_TAIL:]), file=sys.stderr)
    elif budget is not None and timing.test_ppl is None and timing.best_epoch is not None:
        timing.test_ppl = budget_test(out_dir / "best.pt", timing.best_epoch)
    return timing


def budget_test(best_pt: Path, epoch: int) -> float | None:
    """The test perplexity of best.pt when it holds the weights after `epoch` (the best
    validation within the budget), scored as the trainer scores its test split (the averaged
    weights when the run keeps an average, the config's eval_lanes); None when best.pt is
    missing or holds other weights (an epoch that ended after the budget, while the child
    was stopping, may have written it)."""
    if not best_pt.exists():
        return None
    from rnnlm.evaluation.scoring import heldout_ids, load_scored, score

    scored = load_scored([str(best_pt)], torch.device("cpu"))
    if scored[0].epoch != epoch:
        return None
    ids, _ = heldout_ids(scored, "test")
    alone, _ = score(scored, ids, scored[0].cfg.data.eval_lanes, torch.device("cpu"))
    return float(alone[0].ppl)


def round_order(recipes: list, rounds: int) -> list[list]:
    """The order of each round: as given, then reversed, and so on, so that no recipe always
    runs first (on a cold cache, or right after another one heated the machine)."""
    return [list(recipes) if r % 2 == 0 else list(reversed(recipes)) for r in range(rounds)]


def unique_names(configs: list[str]) -> list[str]:
    names: list[str] = []
    for config in configs:
        stem, k = Path(config).stem, 2
        name = stem
        while name in names:
            name, k = f"{stem}-{k}", k + 1
        names.append(name)
    return names


def model_flops(cfg: Config, vocab: int) -> float | None:
    """Matmul FLOPs of one training token of cfg's model (rnnlm.tools.bench.flops_per_token),
    twice that under train.rdrop, which runs every lane twice; None for a kind that formula
    does not know: it counts a W_hh cell's products, and the linear recurrences (diagonal,
    with projections and an MLP per block) have none."""
    m = cfg.model
    if m.kind not in MODEL_KINDS or issubclass(MODEL_KINDS[m.kind], LinearRecurrentLM):
        return None
    copies = 2 if cfg.train.rdrop else 1
    return copies * flops_per_token(m.kind, m.hidden_size, m.num_layers, vocab,
                                    m.embedding_dim or vocab)


def prepare(configs: list[str], sets: list[str], root: Path) -> list[Recipe]:
    """The recipes, each config checked with the overrides before anything is timed (a bad
    one is a ConfigError, one line), and its text tokenised once here: every timed run then
    finds the token cache as any second run of a user does, instead of the first run of the
    first round alone paying for it."""
    if any(item.split("=", 1)[0].strip() == "out_dir" for item in sets):
        raise ConfigError("--set out_dir=... is not for speedrun, which gives every run its "
                          "own out_dir: keep them with --keep DIR")
    recipes = []
    for name, config in zip(unique_names(configs), configs):
        cfg = load_config(config, [*sets, f"out_dir={root / name}"])
        vocab = len(load_corpus(cfg.data).vocab)
        recipes.append(Recipe(name, config, model_flops(cfg, vocab)))
    return recipes


def check_options(target: float, rounds: int, budget: float | None = None) -> None:
    if not target > 0:
        raise ConfigError(f"--target must be a perplexity > 0, got {target}")
    if rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {rounds}")
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise ConfigError(f"--budget must be a number of seconds > 0, got {budget}")


def speedrun(configs: list[str], target: float, rounds: int, sets: list[str],
             keep: str | None, command: str, write: str | None = None,
             budget: float | None = None) -> int:
    """Time every config (`rounds` rounds in turns), each stopped at `budget` seconds from
    its launch when given, print the report on stdout (progress on stderr), write it into
    `write` (a markdown file, its `speedrun` section) when given; 0 when every run finished,
    1 when one failed (it is reported, the others go on)."""
    check_options(target, rounds, budget)
    with tempfile.TemporaryDirectory(prefix="rnnlm-speedrun-") as tmp:
        root = Path(keep) if keep else Path(tmp)
        recipes = prepare(configs, sets, root)
        folders = [root / f"{r.name}-round{k + 1}" for k in range(rounds) for r in recipes]
        taken = [f for f in folders if f.exists()]
        if taken:
            raise ConfigError(f"--keep {keep} already holds {taken[0].name}: give a folder "
                              f"without earlier runs of these recipes")
        ensure_directory(root)
        timings = []
        order = round_order(recipes, rounds)
        runs = sum(len(o) for o in order)
        for k, recipes_in_turn in enumerate(order, 1):
            for recipe in recipes_in_turn:
                label = f"[{len(timings) + 1}/{runs}] round {k}: {recipe.name}"
                print(f"{label} ...", file=sys.stderr, flush=True)
                timing = time_run(recipe, k, root / f"{recipe.name}-round{k}", sets, target,
                                  budget)
                timings.append(timing)
                print(f"{label}: {describe(timing, target)}", file=sys.stderr, flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    text = report(recipes, timings, target, rounds, machine_line(device), command, budget)
    print(text)
    if write:
        section = "speedrun" + (f" budget {budget:g}" if budget else "")
        write_section(Path(write), section + "".join(f" {item}" for item in sets), text)
    return 1 if any(t.error for t in timings) else 0


def describe(timing: Timing, target: float) -> str:
    """One run in one line, for the progress on stderr."""
    if timing.error:
        return f"failed ({timing.error})"
    reached = (f"val ppl <= {target:g} after {timing.reached_s:.1f} s (epoch "
               f"{timing.reached_epoch})" if timing.reached_s is not None
               else f"val ppl <= {target:g} not reached")
    if timing.stopped_s is not None:
        best = fmt_number(timing.best_val_ppl, ".3f")
        return (f"{reached}; stopped at the budget after {timing.stopped_s:.1f} s, "
                f"{timing.epochs} epochs within it, best val ppl {best}")
    return f"{reached}; whole run {timing.wall_s:.1f} s, {timing.epochs} epochs"


# ---------------------------------------------------------------------------- the report


def seconds(values: list[float]) -> str:
    """A median time with its range over rounds ("12.3 s (12.1-12.6)")."""
    text = f"{statistics.median(values):.1f} s"
    return text + (f" ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else "")


def spread(values: list, spec: str) -> str:
    """One value, or the lowest-highest of several different ones."""
    if not values:
        return "–"
    low, high = min(values), max(values)
    return format(low, spec) if low == high else f"{low:{spec}}-{high:{spec}}"


def recipe_figures(recipe: Recipe, timings: list[Timing]):
    """What both tables say of one recipe from its rounds: its timings, those that did not
    fail, those that reached the target, the time-to-target cell, median tokens/s and the
    GFLOP/s they make (None where its kind has no FLOP count)."""
    mine = [t for t in timings if t.recipe == recipe.name]
    ok = [t for t in mine if not t.error]
    reached = [t for t in ok if t.reached_s is not None]
    time_cell = seconds([t.reached_s for t in reached]) if reached else "not reached"
    if reached and len(reached) < len(mine):
        time_cell += f", reached in {len(reached)} of {len(mine)} rounds"
    speed = median_or_none([t.tokens_per_s for t in ok])
    gflops = speed and recipe.flops_per_token and speed * recipe.flops_per_token / 1e9
    return mine, ok, reached, time_cell, speed, gflops


def report(recipes: list[Recipe], timings: list[Timing], target: float, rounds: int,
           machine: str, command: str, budget: float | None = None) -> str:
    """The machine, the command line, one table row per recipe (medians over its rounds)
    and each recipe's time relative to the first recipe's, ratios taken within rounds;
    with a budget, `budget_report`'s table instead."""
    if budget is not None:
        return budget_report(recipes, timings, target, rounds, machine, command, budget)
    head = (f"| recipe | time to val ppl <= {target:g} | epoch | tokens/s | GFLOP/s | "
            f"best val ppl | test ppl | whole run |")
    lines = [head, "|" + "---|" * 8]
    for recipe in recipes:
        mine, ok, reached, time_cell, speed, gflops = recipe_figures(recipe, timings)
        if not ok:
            lines.append(f"| {recipe.name} | failed | – | – | – | – | – | – |")
            continue
        lines.append(
            f"| {recipe.name} | {time_cell} | {spread([t.reached_epoch for t in reached], 'd')} "
            f"| {fmt_number(speed, ',.0f')} | {fmt_number(gflops, '.1f')} "
            f"| {fmt_number(median_or_none([t.best_val_ppl for t in ok]), '.3f')} "
            f"| {fmt_number(median_or_none([t.test_ppl for t in ok]), '.3f')} "
            f"| {seconds([t.wall_s for t in ok])} |")
    how = (f"time to val ppl <= {target:g}: from the launch of `python -m rnnlm train` to the "
           f"first metrics.jsonl record at or under it, as the parent saw it (polled every "
           f"{POLL_S:g} s), {rounds_taken(rounds)}; epoch: the epoch of that record; tokens/s: "
           f"training tokens/s, median over the epochs; GFLOP/s: tokens/s x the model's matmul "
           f"FLOPs per token; whole run: launch to exit")
    return assemble(machine, command, how, lines, timings, relative_times(recipes, timings))


def rounds_taken(rounds: int) -> str:
    """How a table's cells summarise the rounds, for its legend."""
    return f"median over {rounds} rounds taken in turns (range)" if rounds > 1 else "one round"


def assemble(machine: str, command: str, how: str, lines: list[str], timings: list[Timing],
             notes: list[str] = ()) -> str:
    """A report: the machine, the command with the legend `how`, the table `lines`, the
    `notes` and a line for every failed run."""
    failures = [f"- {t.recipe} round {t.round} failed: {t.error}" for t in timings if t.error]
    return "\n".join([f"Machine: {machine}.", f"Command: `{command.strip()}` ({how}).", "",
                      *lines, *([""] + list(notes) if notes else []),
                      *([""] + failures if failures else [])])


def fmt_number(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def relative_times(recipes: list[Recipe], timings: list[Timing]) -> list[str]:
    """"NAME: 0.21x the time of FIRST" for every recipe after the first: the median of the
    ratios taken within each round (range), over the rounds in which both reached it."""
    if len(recipes) < 2:
        return []
    first = recipes[0].name
    by_round: dict[int, dict[str, float]] = {}
    for t in timings:
        if not t.error and t.reached_s is not None:
            by_round.setdefault(t.round, {})[t.recipe] = t.reached_s
    notes = []
    for recipe in recipes[1:]:
        ratios = [times[recipe.name] / times[first] for times in by_round.values()
                  if recipe.name in times and first in times and times[first] > 0]
        if not ratios:
            notes.append(f"{recipe.name}: no round in which both it and {first} reached the "
                         f"target, no ratio")
            continue
        ranged = f" (rounds: {min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
        notes.append(f"{recipe.name}: {statistics.median(ratios):.2f}x the time of "
                     f"{first}{ranged}")
    return notes


def budget_report(recipes: list[Recipe], timings: list[Timing], target: float, rounds: int,
                  machine: str, command: str, budget: float) -> str:
    """The report of runs under a wall-time budget: per recipe (medians over its rounds) the
    epochs completed within the budget, the best validation perplexity within it and its
    epoch, the test perplexity of those weights, tokens/s, the time to target when reached
    within the budget, and how the run ended (stopped at the budget, or by itself)."""
    lines = [f"| recipe | epochs within {budget:g} s | best val ppl | at epoch | test ppl | "
             f"tokens/s | GFLOP/s | time to val ppl <= {target:g} | run ended |",
             "|" + "---|" * 9]
    for recipe in recipes:
        mine, ok, _, time_cell, speed, gflops = recipe_figures(recipe, timings)
        if not ok:
            lines.append(f"| {recipe.name} | failed |" + " – |" * 7)
            continue
        stopped = [t.stopped_s for t in ok if t.stopped_s is not None]
        ended = [t.wall_s for t in ok if t.stopped_s is None]
        how_ended = "; ".join(filter(None, [
            stopped and f"stopped at {seconds(stopped)}" + rounds_of(stopped, mine),
            ended and f"by itself at {seconds(ended)}" + rounds_of(ended, mine)]))
        lines.append(
            f"| {recipe.name} | {spread([t.epochs for t in ok], 'd')} "
            f"| {fmt_number(median_or_none([t.best_val_ppl for t in ok]), '.3f')} "
            f"| {spread([t.best_epoch for t in ok if t.best_epoch is not None], 'd')} "
            f"| {fmt_number(median_or_none([t.test_ppl for t in ok]), '.3f')} "
            f"| {fmt_number(speed, ',.0f')} | {fmt_number(gflops, '.1f')} "
            f"| {time_cell} | {how_ended} |")
    how = (f"each run stopped (SIGTERM) when its clock, from the launch of `python -m rnnlm "
           f"train`, passed {budget:g} s; only the metrics.jsonl records the parent saw "
           f"within {budget:g} s count (polled every {POLL_S:g} s), {rounds_taken(rounds)}; "
           f"best val ppl: the lowest validation perplexity within the budget; test ppl: the "
           f"test perplexity of those weights (the trainer's own test record, or best.pt "
           f"scored after the stop; n/a when neither holds them); tokens/s: training "
           f"tokens/s, median over the epochs within the budget; run ended: when the budget "
           f"stopped it or it ended by itself, "
           f"seconds from launch")
    return assemble(machine, command, how, lines, timings)


def rounds_of(values: list, runs: list) -> str:
    """", in 2 of 3 rounds" when not every run ended this way."""
    return f", in {len(values)} of {len(runs)} rounds" if len(values) < len(runs) else ""
