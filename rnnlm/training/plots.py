"""Perplexity curves as PNG files, drawn without a display (matplotlib's Agg canvas).

Figures are built with matplotlib's object API (no pyplot, so no global state and no GUI
backend) and written atomically (rnnlm.files): a reader never sees half a file, and a
failed write leaves the previous figure.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rnnlm.files import ensure_directory, write_atomic

# A log axis helps once the curve spans more than this factor (early epochs near the
# vocabulary size, late ones near 1-5); below it a linear axis is easier to read.
LOG_SCALE_RATIO = 4.0


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None and "epoch" in r]
    return [e for e, _ in points], [v for _, v in points]


def _save(fig: Figure, path: Path) -> None:
    path = Path(path)
    ensure_directory(path.parent)
    FigureCanvasAgg(fig)
    write_atomic(path, lambda f: fig.savefig(f, dpi=110, format="png"))


def _finish(ax, values: list[float], title: str) -> None:
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > LOG_SCALE_RATIO:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")


def plot_perplexity(records: list[dict], path: Path, title: str = "") -> None:
    """Training and (when evaluated) validation perplexity against the epoch."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    values: list[float] = []
    for key, label, style in (("train_ppl", "train", "-"), ("val_ppl", "validation", "o-")):
        epochs, ppl = _series(records, key)
        if epochs:
            ax.plot(epochs, ppl, style, label=label, markersize=3)
            values += ppl
    _finish(ax, values, title)
    _save(fig, path)


def plot_comparison(curves: dict[str, list[dict]], path: Path, title: str = "") -> None:
    """One colour per variant: training perplexity dashed, validation solid."""
    fig = Figure(figsize=(8, 4.8))
    ax = fig.add_subplot()
    values: list[float] = []
    for i, (name, records) in enumerate(curves.items()):
        colour = f"C{i % 10}"
        epochs, ppl = _series(records, "train_ppl")
        if epochs:
            ax.plot(epochs, ppl, "--", color=colour, label=f"{name} (train)")
            values += ppl
        epochs, ppl = _series(records, "val_ppl")
        if epochs:
            ax.plot(epochs, ppl, "-", color=colour, label=f"{name} (val)")
            values += ppl
    _finish(ax, values, title)
    _save(fig, path)
