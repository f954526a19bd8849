"""Train one config under several variants and compare them in one table and one plot.

`--vary KEY=V1,V2` (repeatable: every combination of the values), `--seeds N` (each variant
with seeds seed, seed+1, ..., seed+N-1), `--set KEY=VALUE` (applied to every variant). Every
variant gets the same budget: the config's epochs and data. Run k of a variant writes its
own out_dir/<variant>/seed<seed>, and out_dir itself receives comparison.md (mean ± std over
seeds), comparison.csv (one row per run) and comparison.png (all curves).

Each run is a separate `rnnlm train` process, one after another: a variant that crashes or is
refused is reported in the table and the others go on; runs never compete for the CPU, so
their tokens/s are comparable.
"""

from __future__ import annotations

import csv
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

from rnnlm.config import ConfigError, load_config
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


def run_one(config: str, overrides: list[str], timeout: float | None) -> str | None:
    """Train in a child process; None on success, else a one-line reason."""
    cmd = [sys.executable, "-m", "rnnlm", "train", "--config", config, "--quiet"]
    for item in overrides:
        cmd += ["--set", item]
    path = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": path})
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    if proc.returncode != 0:
        lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        return f"exit {proc.returncode}: {lines[-1] if lines else 'no message'}"
    return None


def compare(config: str, varies: list[str], seeds: int = 1, sets: list[str] = (),
            timeout: float | None = None, log=print,
            command: str | None = None) -> tuple[Path, list[RunResult]]:
    """Run every variant and seed; write the table, CSV and plot; return (out_dir, runs).
    `command`: the command line comparison.md records (default: the `rnnlm compare` that
    asks for the same)."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    variants = make_variants(varies)
    base = load_config(config, list(sets))  # the shared settings must be valid on their own
    out_dir = Path(base.out_dir)
    plan: list[tuple[Variant, int, list[str], RunResult]] = []
    for variant in variants:
        for k in range(seeds):
            seed = base.seed + k
            run_dir = out_dir / variant.name / f"seed{seed}"
            overrides = [*sets, *variant.overrides, f"seed={seed}", f"out_dir={run_dir}"]
            result = RunResult(variant.name, seed, run_dir)
            try:
                load_config(config, overrides)
            except ConfigError as exc:
                result.error = f"invalid config: {exc}"
            plan.append((variant, seed, overrides, result))
    if all(r.error for *_, r in plan):
        raise ConfigError(plan[0][3].error)

    results = []
    for i, (variant, seed, overrides, result) in enumerate(plan, 1):
        label = f"[{i}/{len(plan)}] {variant.name} seed {seed}"
        if result.error is None:
            start = time.perf_counter()
            result.error = run_one(config, overrides, timeout)
            result.records = read_records(result.out_dir)
            result.metrics = summarise(result.records)
            if result.error is None and not result.metrics:
                result.error = "no metrics were written"
            took = time.perf_counter() - start
            log(f"{label}: " + (f"failed ({result.error})" if result.error else
                               f"done in {took:.1f} s" + _val_note(result.metrics)))
        else:
            log(f"{label}: skipped ({result.error})")
        results.append(result)

    write_outputs(out_dir, variants, results, config,
                  command or compare_command(config, varies, seeds, sets))
    log(markdown_table(variants, results))
    log(f"wrote {out_dir / 'comparison.md'}, comparison.csv and comparison.png")
    return out_dir, results


def _val_note(metrics: dict) -> str:
    if "best_val_ppl" in metrics:
        return f", best val ppl {metrics['best_val_ppl']:.3f}"
    return f", train ppl {metrics['final_train_ppl']:.3f}"


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
        cells += [mean_std([r.metrics[key] for r in ok if key in r.metrics], digits)
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

    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = sorted({r.seed for r in results})
    (out_dir / "comparison.md").write_text(
        f"# Comparison\n\n`{command}` (seeds {', '.join(map(str, seeds))})\n\n"
        f"{markdown_table(variants, results)}\n\n![curves](comparison.png)\n",
        encoding="utf-8")
    columns = ["variant", "seed", "status", "epochs", *(k for k, _, _ in METRICS),
               "test_bpc", "best_epoch", "out_dir"]
    with open(out_dir / "comparison.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            writer.writerow({"variant": r.variant, "seed": r.seed,
                             "status": "ok" if r.error is None else f"failed: {r.error}",
                             "out_dir": str(r.out_dir), **r.metrics})
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

