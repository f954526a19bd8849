"""Train one config under several variants and compare them in one table and one plot.

`--vary KEY=V1,V2` (repeatable: every combination of the values), `--seeds N` (each variant
with seeds seed, seed+1, ..., seed+N-1), `--set KEY=VALUE` (applied to every variant). Every
variant gets the same budget: the config's epochs and data. Run k of a variant writes its
own out_dir/<variant>/seed<seed>, and out_dir itself receives comparison.md (mean ± std over
seeds), comparison.csv (one row per run) and comparison.png (all curves).

Every variant's config is checked before any run starts (a bad `--vary` value is one line).
Each run is a separate `rnnlm train` process, one after another: a run that crashes is
reported in the table and the others go on; runs never compete for the CPU, so their tokens/s
are comparable. When no run succeeds, the tables are not written.

An out_dir that holds an earlier comparison (its tables, or checkpoints or logs in the run
folders) is refused before anything trains, unless `--overwrite` (every run starts over) or
`--resume` (finished runs are kept, runs with a last.pt continue from it, the others start)
says what to do with it.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rnnlm.checkpoint import checkpoint_config, load_checkpoint
from rnnlm.config import Config, ConfigError, load_config
from rnnlm.config.schema import changed_keys
from rnnlm.files import ensure_directory, write_atomic
from rnnlm.training.metrics import read_records

# The folder that holds this rnnlm package: the child runs `python -m rnnlm train` with it on
# its path, so it trains with this very code, from a checkout or from an installed package.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]
METRICS = [  # (key, column title, digits)
    ("final_train_ppl", "final train ppl", 3),
    ("best_val_ppl", "best val ppl", 3),
    ("best_val_bpc", "best val bpc", 3),
    ("test_ppl", "test ppl", 3),
    ("tokens_per_s", "tokens/s", 0),
    ("wall_s", "wall s", 1),
]


@dataclass
class Variant:
    name: str
    overrides: list[str]  # KEY=VALUE, as --set takes them


@dataclass
class RunResult:
    variant: str
    seed: int
    out_dir: Path
    error: str | None = None
    metrics: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------- variants


def split_values(text: str) -> list[str]:
    """Split `a,b,[c,d]` at the commas outside brackets and quotes."""
    values, depth, start, quote = [], 0, 0, None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return [v.strip() for v in values]


def parse_vary(item: str) -> tuple[str, list[str]]:
    if "=" not in item:
        raise ConfigError(f"--vary {item!r} must look like key=v1,v2, e.g. "
                          f"data.iterator=sequential,random")
    key, text = item.split("=", 1)
    values = split_values(text)
    if not key.strip() or any(v == "" for v in values):
        raise ConfigError(f"--vary {item!r}: empty key or value")
    if len(set(values)) != len(values):
        raise ConfigError(f"--vary {item!r} repeats a value")
    return key.strip(), values


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def make_variants(varies: list[str]) -> list[Variant]:
    """The product of every --vary; names use the last part of each key when unambiguous."""
    axes = [parse_vary(v) for v in varies]
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise ConfigError("--vary names the same key twice: give all its values in one --vary")
    short = [k.rsplit(".", 1)[-1] for k in keys]
    labels = short if len(set(short)) == len(short) else keys
    variants = []
    for combo in itertools.product(*(values for _, values in axes)):
        name = "_".join(f"{_slug(label)}-{_slug(value)}" for label, value in zip(labels, combo))
        variants.append(Variant(name or "base",
                                [f"{k}={v}" for k, v in zip(keys, combo)]))
    return variants or [Variant("base", [])]


# ---------------------------------------------------------------------------- runs


def summarise(records: list[dict]) -> dict:
    epochs = [r for r in records if "epoch" in r and "train_ppl" in r]
    if not epochs:
        return {}
    out = {"final_train_ppl": epochs[-1]["train_ppl"],
           "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in epochs),
           "wall_s": epochs[-1]["wall_s"], "epochs": len(epochs)}
    evaluated = [r for r in epochs if r.get("val_ppl") is not None]
    if evaluated:
        best = min(evaluated, key=lambda r: r["val_ppl"])
        out.update(best_val_ppl=best["val_ppl"], best_val_bpc=best["val_bpc"],
                   best_epoch=best["epoch"])
    tests = [r for r in records if r.get("event") == "test"]
    if tests:
        out.update(test_ppl=tests[-1]["test_ppl"], test_bpc=tests[-1]["test_bpc"])
    return out


def run_one(config: str, overrides: list[str], timeout: float | None,
            how: list[str] = ()) -> str | None:
    """Train in a child process; None on success, else a one-line reason. `how`: what the
    child starts from: nothing (a new run), ["--overwrite"] (start over in a folder with a
    checkpoint) or ["--resume", LAST_PT] (continue it; the config then comes from there)."""
    start = ["--config", config] if "--resume" not in how else []
    cmd = [sys.executable, "-m", "rnnlm", "train", *start, *how, "--quiet"]
    for item in overrides:
        cmd += ["--set", item]
    path = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")]))
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": path})
    try:
        _, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_child(child, terminate=True)  # SIGTERM: the run saves last.pt; --resume continues
        return f"timed out after {timeout:.0f} s"
    except KeyboardInterrupt:
        stop_child(child, terminate=False)  # the child got the Ctrl-C too and is saving last.pt
        raise
    if child.returncode != 0:
        lines = [x for x in stderr.strip().splitlines() if x.strip()]
        return f"exit {child.returncode}: {lines[-1] if lines else 'no message'}"
    return None


STOP_GRACE_S = 120  # for a stopped run to finish its batch and write last.pt


def stop_child(child: subprocess.Popen, terminate: bool) -> None:
    """Let a stopped training run save itself (the trainer finishes the batch on SIGINT or
    SIGTERM), killed only when it takes longer than STOP_GRACE_S or on a second Ctrl-C."""
    try:
        if terminate:
            child.terminate()
        child.communicate(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# What a run folder of an earlier comparison holds, and the comparison's own files.
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")
OUTPUT_FILES = ("comparison.md", "comparison.csv", "comparison.png")
RERUN_MODES = ("overwrite", "resume")


@dataclass
class Planned:
    """One run of the plan: its variant, seed, `--set` overrides, config, and what the child
    starts from (`how`, run_one's argument); `done`: finished by an earlier comparison."""

    variant: Variant
    seed: int
    overrides: list[str]
    config: Config
    result: RunResult
    how: list[str] = field(default_factory=list)
    done: bool = False


def plan_runs(config: str, variants: list[Variant], seeds: int, sets: list[str],
              out_dir: Path, base_seed: int) -> list[Planned]:
    """Every variant and seed with its checked config. A variant whose config is not valid
    is a ConfigError naming it and its values, before anything trains."""
    plan = []
    for variant in variants:
        for k in range(seeds):
            seed = base_seed + k
            run_dir = out_dir / variant.name / f"seed{seed}"
            overrides = [*sets, *variant.overrides, f"seed={seed}", f"out_dir={run_dir}"]
            try:
                cfg = load_config(config, overrides)
            except ConfigError as exc:
                reason = str(exc).removeprefix("--set: ")
                raise ConfigError(f"variant {variant.name} ({', '.join(variant.overrides)}) is "
                                  f"not a valid config: {reason}") from None
            plan.append(Planned(variant, seed, overrides, cfg,
                                RunResult(variant.name, seed, run_dir)))
    return plan


def earlier_results(out_dir: Path, plan: list[Planned]) -> list[Path]:
    """The files of an earlier comparison into this out_dir that this one would replace."""
    found = [out_dir / name for name in OUTPUT_FILES if (out_dir / name).exists()]
    for run in plan:
        found += [run.result.out_dir / name for name in RUN_FILES
                  if (run.result.out_dir / name).exists()]
    return found


def decide_reruns(plan: list[Planned], rerun: str | None, out_dir: Path) -> None:
    """What each run starts from when out_dir holds an earlier comparison: refused without
    `rerun`; "overwrite": every run starts over; "resume": a finished run is kept, one with
    last.pt continues from it, the others start (over). Every refusal comes before any run
    trains."""
    if rerun not in (None, *RERUN_MODES):
        raise ValueError(f"rerun must be None or one of {RERUN_MODES}, got {rerun!r}")
    earlier = earlier_results(out_dir, plan)
    if not earlier:
        return
    if rerun is None:
        raise ConfigError(f"{out_dir} holds an earlier comparison ({earlier[0]}): pass "
                          f"--resume to continue its runs (finished ones are kept), "
                          f"--overwrite to start them all over, or pick another out_dir "
                          f"(--set out_dir=...)")
    for run in plan:
        folder = run.result.out_dir
        if rerun == "overwrite" or not (folder / "last.pt").exists():
            # A run killed before its first last.pt may have left best.pt: nothing to continue
            held = any((folder / name).exists() for name in ("last.pt", "best.pt"))
            run.how = ["--overwrite"] if held else []
            continue
        run.done = _finished(folder / "last.pt", run.config)
        run.how = [] if run.done else ["--resume", str(folder / "last.pt")]


def _finished(last: Path, cfg: Config) -> bool:
    """Whether the run saved in `last` has finished (all of cfg's epochs, or stopped early)
    rather than being one to continue; a ConfigError when it was trained with another config
    than `cfg` (only train.epochs may grow)."""
    ckpt = load_checkpoint(last)
    saved = checkpoint_config(ckpt, str(last))
    for key, before, after in changed_keys(saved, cfg):
        if key not in ("out_dir", "train.epochs"):
            raise ConfigError(f"--resume: {last} was trained with {key}={before!r}, but this "
                              f"comparison asks for {key}={after!r}: pass --overwrite to start "
                              f"the runs over, or pick another out_dir (--set out_dir=...)")
    progress = ckpt["progress"]
    if progress.get("batch"):
        return False  # stopped inside an epoch
    stopper = (ckpt.get("run_state") or {}).get("early_stop") or {}
    patience = cfg.train.early_stop_patience
    stopped_early = patience is not None and stopper.get("bad_evaluations", 0) >= patience
    return stopped_early or progress["epoch"] >= cfg.train.epochs


def compare(config: str, varies: list[str], seeds: int = 1, sets: list[str] = (),
            timeout: float | None = None, log=print, command: str | None = None,
            rerun: str | None = None) -> tuple[Path, list[RunResult]]:
    """Run every variant and seed; write the table, CSV and plot; return (out_dir, runs).
    `command`: the command line comparison.md records (default: the `rnnlm compare` that
    asks for the same). `rerun`: what to do with an earlier comparison in the same out_dir
    (decide_reruns): None refuses it, "overwrite" starts its runs over, "resume" keeps the
    finished ones and continues the others. Every variant's config is checked before any run
    starts. When no run succeeds, nothing is written (earlier tables stay as they were)."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    variants = make_variants(varies)
    base = load_config(config, list(sets))  # the shared settings must be valid on their own
    out_dir = Path(base.out_dir)
    plan = plan_runs(config, variants, seeds, list(sets), out_dir, base.seed)
    decide_reruns(plan, rerun, out_dir)

    results = []
    for i, run in enumerate(plan, 1):
        result = run.result
        label = f"[{i}/{len(plan)}] {run.variant.name} seed {run.seed}"
        start = time.perf_counter()
        if not run.done:
            result.error = run_one(config, run.overrides, timeout, run.how)
        try:
            result.records = read_records(result.out_dir)
        except ConfigError as exc:
            result.error = result.error or str(exc)
        result.metrics = summarise(result.records)
        if result.error is None and not result.metrics:
            result.error = "no metrics were written"
        took = time.perf_counter() - start
        if result.error:
            log(f"{label}: failed ({result.error})")
        elif run.done:
            log(f"{label}: finished earlier, kept" + _val_note(result.metrics))
        else:
            how = "continued, " if "--resume" in run.how else ""
            log(f"{label}: {how}done in {took:.1f} s" + _val_note(result.metrics))
        results.append(result)

    log(markdown_table(variants, results))
    if all(r.error for r in results):
        kept = " (the earlier ones are kept)" if earlier_results(out_dir, []) else ""
        log(f"no run succeeded: comparison.md, .csv and .png not written{kept}")
        return out_dir, results
    write_outputs(out_dir, variants, results, config,
                  command or compare_command(config, varies, seeds, sets))
    log(f"wrote {out_dir / 'comparison.md'}, comparison.csv and comparison.png")
    return out_dir, results


def _val_note(metrics: dict) -> str:
    if metrics.get("best_val_ppl") is not None:
        return f", best val ppl {metrics['best_val_ppl']:.3f}"
    if metrics.get("final_train_ppl") is not None:
        return f", train ppl {metrics['final_train_ppl']:.3f}"
    return ""


# ---------------------------------------------------------------------------- outputs


def mean_std(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:,.{digits}f}"
    return f"{mean:,.{digits}f} ± {statistics.stdev(values):,.{digits}f}"


def markdown_table(variants: list[Variant], results: list[RunResult]) -> str:
    shown = [m for m in METRICS if any(m[0] in r.metrics for r in results)]
    head = ["variant", "runs"] + [title for _, title, _ in shown]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant in variants:
        mine = [r for r in results if r.variant == variant.name]
        ok = [r for r in mine if r.error is None]
        cells = [variant.name, f"{len(ok)}/{len(mine)}"]
        cells += [mean_std([r.metrics[key] for r in ok if r.metrics.get(key) is not None],
                           digits)
                  for key, _, digits in shown]
        rows.append("| " + " | ".join(cells) + " |")
    failures = [r for r in results if r.error]
    if failures:
        rows.append("")
        rows += [f"- {r.variant} seed {r.seed} failed: {r.error}" for r in failures]
    return "\n".join(rows)


def mean_curves(runs: list[RunResult]) -> list[dict]:
    """Per-epoch means over the seeds that reached that epoch."""
    by_epoch: dict[int, dict[str, list[float]]] = {}
    for run in runs:
        for r in run.records:
            if "epoch" not in r:
                continue
            slot = by_epoch.setdefault(r["epoch"], {"train_ppl": [], "val_ppl": []})
            for key in slot:
                if r.get(key) is not None:
                    slot[key].append(r[key])
    return [{"epoch": e, **{k: statistics.fmean(v) for k, v in slot.items() if v}}
            for e, slot in sorted(by_epoch.items())]


def compare_command(config: str, varies: list[str], seeds: int, sets: list[str]) -> str:
    return " ".join(["rnnlm compare --config", config, *(f"--vary {v}" for v in varies),
                     *([f"--seeds {seeds}"] if seeds > 1 else []), *(f"--set {s}" for s in sets)])


def write_outputs(out_dir: Path, variants, results, config: str, command: str) -> None:
    from rnnlm.training.plots import (
        plot_comparison,  # matplotlib only once there is something to draw
    )

    ensure_directory(out_dir, "out_dir", "pick another out_dir (--set out_dir=...)")
    seeds = sorted({r.seed for r in results})
    write_atomic(out_dir / "comparison.md",
                 f"# Comparison\n\n`{command}` (seeds {', '.join(map(str, seeds))})\n\n"
                 f"{markdown_table(variants, results)}\n\n![curves](comparison.png)\n")
    columns = ["variant", "seed", "status", "epochs", *(k for k, _, _ in METRICS),
               "test_bpc", "best_epoch", "out_dir"]
    table = io.StringIO(newline="")  # the csv module writes its own line ends
    writer = csv.DictWriter(table, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in results:
        writer.writerow({"variant": r.variant, "seed": r.seed,
                         "status": "ok" if r.error is None else f"failed: {r.error}",
                         "out_dir": str(r.out_dir), **r.metrics})
    write_atomic(out_dir / "comparison.csv", table.getvalue())
    curves = {v.name: mean_curves([r for r in results if r.variant == v.name and
                                   r.error is None]) for v in variants}
    plot_comparison({k: v for k, v in curves.items() if v}, out_dir / "comparison.png",
                    title=f"{Path(config).stem}: mean over {len(seeds)} seed(s)")


def parse_seeds(text: str) -> int:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"--seeds must be a whole number >= 1, got {text!r}")
    return value

