"""Plots of the gradient-flow diagnostics (rnnlm.diagnostics.gradients), drawn with matplotlib's Agg
backend (no display needed).

A run trained with ``train.diagnostics: true`` (or measured by ``diagnose.py``) holds
``metrics.jsonl`` (the per-epoch ``diag_*`` keys) and ``diagnostics.json`` (the eigenvalues
before and after training and the truncation pattern). From those:

* ``plot_run``: one run's dashboard (``diagnostics.png``);
* ``plot_gradient_norms``: ||dL/dh_t|| against distance, several runs side by side;
* ``plot_eigenvalues``: the eigenvalues of W_hh in the complex plane with the unit circle;
* ``plot_lambdas``: the eigenvalues over training, coloured by epoch, one unit disk per layer:
  for a diagonal recurrence all N of them (the LRU's lambda; for minGRU and minLSTM, whose
  a_t = 1 - z_t depends on the input, each channel's mean a_t over held-out text) above the
  histograms of |a_t|; for a dense W_hh the leading ones of every block, on one disk;
* ``plot_truncation_patterns``: which steps received gradient from which losses.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnnlm.errors import ConfigError
from rnnlm.files import ensure_directory, write_atomic

SUMMARY_FILE = "diagnostics.json"
PLOT_FILE = "diagnostics.png"
MEASURED_PREFIX = "diagnose-"  # `rnnlm diagnose --checkpoint RUN/X.pt` writes RUN/diagnose-X/
#: the spectra a measured checkpoint's diagnostics.json keeps beside its gradient norms, so that
#: its one record draws like a training run's
MEASURED_KEYS = ("diag_eig", "diag_lambda", "diag_a")


@dataclass
class RunDiagnostics:
    name: str
    records: list[dict]  # metrics.jsonl records that carry diag_* keys
    summary: dict  # diagnostics.json

    @property
    def label(self) -> str:
        s = self.summary
        return f"{s['kind']} h={s['hidden_size']}, {s['truncation']}"


def load_run(path: str | Path) -> RunDiagnostics:
    """A run folder (or its diagnostics.json); a clear error when it has no diagnostics. A
    run folder trained without diagnostics stands for the one checkpoint of it that
    `rnnlm diagnose --checkpoint` measured (its diagnose-NAME folder), so the command that the
    error suggests is all it takes."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"run {path} not found: pass a run folder (out_dir) or its "
                          f"{SUMMARY_FILE}")
    folder = path if path.is_dir() else path.parent
    name = folder.name
    summary_path = folder / SUMMARY_FILE
    if not summary_path.is_file():
        measured = sorted(p.parent for p in folder.glob(f"{MEASURED_PREFIX}*/{SUMMARY_FILE}"))
        if len(measured) > 1:
            raise ConfigError(f"{folder} holds no {SUMMARY_FILE} of its own but several "
                              f"measured checkpoints: pass one of them to --runs: "
                              f"{', '.join(map(str, measured))}")
        if not measured:
            raise ConfigError(f"{folder} holds no {SUMMARY_FILE}: {_measure_hint(folder)}")
        folder, name = measured[0], f"{name}/{measured[0].name}"
        summary_path = folder / SUMMARY_FILE
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    records = []
    metrics = folder / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                if "diag_gnorm" in record:
                    records.append(record)
    if not records and "gnorm" in summary:  # a checkpoint measured by diagnose.py
        records = [{"epoch": summary.get("epoch", 0), "diag_gnorm": summary["gnorm"],
                    "diag_gnorm_last": summary["gnorm_last"],
                    **{key: summary[key] for key in MEASURED_KEYS if key in summary}}]
    return RunDiagnostics(name=name, records=records, summary=summary)


def _measure_hint(folder: Path) -> str:
    """What to run for diagnostics of `folder`: measure its checkpoint (whose diagnose-NAME
    folder load_run then finds), or train with them."""
    checkpoints = [folder / n for n in ("last.pt", "best.pt") if (folder / n).is_file()]
    if not checkpoints:
        return ("train with --set train.diagnostics=true, or measure a checkpoint with "
                "rnnlm diagnose --checkpoint RUN/last.pt and pass RUN again")
    ckpt = checkpoints[0]
    return (f"measure its checkpoint first with rnnlm diagnose --checkpoint "
            f"{shlex.quote(str(ckpt))} (it writes {folder / (MEASURED_PREFIX + ckpt.stem)}, "
            f"which --runs {shlex.quote(str(folder))} then finds), or train with --set "
            f"train.diagnostics=true")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pick(records: list[dict], n: int = 5) -> list[dict]:
    if len(records) <= n:
        return records
    index = np.unique(np.linspace(0, len(records) - 1, n).round().astype(int))
    return [records[i] for i in index]


def _positive(values) -> np.ndarray:
    a = np.asarray(values, dtype=float)
    return np.where(a > 0, a, np.nan)  # log axes: a zero gradient is drawn as a gap


def draw_gradient_norms(ax, run: RunDiagnostics) -> None:
    plt = _pyplot()
    chosen = _pick(run.records)
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(chosen), 1)))
    for record, color in zip(chosen, colors):
        d = np.arange(len(record["diag_gnorm"]))
        ax.plot(d, _positive(record["diag_gnorm"]), color=color,
                label=f"epoch {record['epoch']}")
        ax.plot(d, _positive(record["diag_gnorm_last"]), color=color, linestyle="--")
    ax.set_yscale("log")
    ax.set_xlabel("distance from the end of the window (steps)")
    ax.set_ylabel("mean ||dL/dh_t||")
    ax.set_title(run.label, fontsize=9)
    ax.legend(fontsize=7, title="solid: window loss\ndashed: last step's loss",
              title_fontsize=7)


def draw_eigenvalues(ax, run: RunDiagnostics) -> None:
    plt = _pyplot()
    theta = np.linspace(0, 2 * np.pi, 400)
    ax.plot(np.cos(theta), np.sin(theta), color="black", linewidth=0.8)
    initial = run.summary.get("eig_init") or {}
    for points in initial.values():
        z = np.asarray(points, dtype=float).reshape(-1, 2)
        ax.scatter(z[:, 0], z[:, 1], s=4, color="lightgray")
    blocks = run.summary["eig_final"]
    colors = plt.cm.tab10(np.arange(len(blocks)) % 10)
    for (name, points), color in zip(blocks.items(), colors):
        z = np.asarray(points, dtype=float).reshape(-1, 2)
        rho = float(np.hypot(z[:, 0], z[:, 1]).max()) if len(z) else 0.0
        ax.scatter(z[:, 0], z[:, 1], s=5, color=color, label=f"{name} (rho {rho:.2f})")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("Re")
    ax.set_ylabel("Im")
    ax.set_title(f"eigenvalues of W_hh: {run.label}\n(gray: at initialisation)", fontsize=9)
    ax.legend(fontsize=7, loc="upper right", markerscale=2)


def draw_truncation_pattern(ax, run: RunDiagnostics, fig=None) -> None:
    pattern = run.summary.get("pattern")
    if not pattern:
        ax.set_axis_off()
        return
    norms = np.asarray(pattern["norms"], dtype=float)
    with np.errstate(divide="ignore"):
        shown = np.ma.masked_where(norms <= 0, np.log10(np.where(norms > 0, norms, 1.0)))
    image = ax.imshow(shown, cmap="magma_r", origin="upper", interpolation="nearest")
    edges = np.cumsum(pattern["lengths"])[:-1] - 0.5
    for e in edges:
        ax.axvline(e, color="tab:blue", linewidth=0.6)
        ax.axhline(e, color="tab:blue", linewidth=0.6)
    ax.set_xlabel("step t receiving gradient")
    ax.set_ylabel("loss at step s")
    lengths = ", ".join(map(str, pattern["lengths"]))
    ax.set_title(f"{_strategy(run.summary)} ({run.summary['kind']}): windows {lengths}",
                 fontsize=9)
    if fig is not None:
        fig.colorbar(image, ax=ax, shrink=0.8, label="log10 ||dl_s/dh_t|| (blank: none)")


def _draw_history(ax, run: RunDiagnostics) -> None:
    epochs = [r["epoch"] for r in run.records if "diag_rho" in r]
    if not epochs:
        ax.set_axis_off()
        return
    names = list(run.records[-1]["diag_rho"])
    for name in names:
        ax.plot(epochs, [r["diag_rho"][name] for r in run.records if "diag_rho" in r],
                label=name)
    ax.axhline(1.0, color="black", linewidth=0.6, linestyle=":")
    ax.set_xlabel("epoch")
    ax.set_ylabel("spectral radius of W_hh")
    ax.legend(fontsize=7)
    clipped = [r.get("clipped_frac") for r in run.records if "diag_rho" in r]
    if all(c is not None for c in clipped):
        twin = ax.twinx()
        twin.plot(epochs, clipped, color="gray", linestyle="--")
        twin.set_ylabel("fraction of clipped steps (dashed)")
        twin.set_ylim(-0.02, 1.02)
    ax.set_title("spectral radius and clipping over training", fontsize=9)


def plot_run(run: RunDiagnostics, path: str | Path) -> Path:
    """One run's dashboard: gradient norms, spectral radius + clipping, eigenvalues, pattern."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 9))
    draw_gradient_norms(axes[0, 0], run)
    _draw_history(axes[0, 1], run)
    draw_eigenvalues(axes[1, 0], run)
    draw_truncation_pattern(axes[1, 1], run, fig)
    return _save(fig, path)


def _side_by_side(runs, draw, path, width=4.6, height=4.2, with_fig=False) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(width * len(runs), height), squeeze=False)
    for ax, run in zip(axes[0], runs):
        if with_fig:
            draw(ax, run, fig)
        else:
            draw(ax, run)
    return _save(fig, path)


def plot_gradient_norms(runs: list[RunDiagnostics], path: str | Path) -> Path:
    return _side_by_side(runs, draw_gradient_norms, path)


def plot_eigenvalues(runs: list[RunDiagnostics], path: str | Path) -> Path:
    return _side_by_side(runs, draw_eigenvalues, path, height=4.6)


def _points(pairs) -> np.ndarray:
    z = np.asarray(pairs, dtype=float).reshape(-1, 2)
    return z[:, 0] + 1j * z[:, 1]


def lambda_history(run: RunDiagnostics) -> tuple[list[tuple[int, dict[str, np.ndarray]]], str]:
    """[(epoch, {panel: complex points})] from initialisation (epoch 0) through the recorded
    epochs, and what the points are. A diagonal recurrence (records with diag_a) gives one
    panel per layer: its exact eigenvalues where a_t does not depend on the input, else each
    channel's mean a_t over the held-out windows. A dense W_hh gives one panel, "", holding
    the leading eigenvalues of every block (diag_eig)."""
    summary = run.summary
    diagonal = [r for r in run.records if "diag_a" in r]
    history: list[tuple[int, dict[str, np.ndarray]]] = []
    if diagonal:
        moving = any(layer["input_dependent"] for layer in diagonal[-1]["diag_a"].values())

        def panels(lambdas: dict | None, coefficients: dict | None) -> dict[str, np.ndarray]:
            if moving:
                return {name: _points(c["mean"]) for name, c in (coefficients or {}).items()}
            return {name: _points(ev) for name, ev in (lambdas or {}).items()}

        initial = panels(summary.get("eig_init"), summary.get("coef_init"))
        if initial:
            history.append((0, initial))
        history += [(r["epoch"], panels(r["diag_lambda"], r["diag_a"])) for r in diagonal]
        what = ("each channel's mean a_t on held-out text" if moving
                else "lambda of every channel (exact)")
        return history, what
    leading = max((len(ev) for r in run.records for ev in r.get("diag_eig", {}).values()),
                  default=0)
    if summary.get("eig_init") and leading:
        history.append((0, {"": np.concatenate([_points(ev)[:leading] for ev in
                                                summary["eig_init"].values()])}))
    history += [(r["epoch"], {"": np.concatenate([_points(ev) for ev in
                                                  r["diag_eig"].values()])})
                for r in run.records if r.get("diag_eig")]
    return history, f"{leading} leading eigenvalues per block of W_hh"


def draw_lambda_disk(ax, history, panel: str, title: str, norm) -> None:
    """One panel's points on the unit disk, coloured by epoch (epoch 0: initialisation)."""
    plt = _pyplot()
    theta = np.linspace(0, 2 * np.pi, 400)
    ax.plot(np.cos(theta), np.sin(theta), color="black", linewidth=0.8)
    for epoch, panels in history:
        z = panels.get(panel, np.zeros(0, dtype=complex))
        ax.scatter(z.real, z.imag, s=6, color=plt.cm.viridis(norm(epoch)), alpha=0.7,
                   linewidths=0)
    ax.set_xlim(-1.08, 1.08)
    ax.set_ylim(-1.08, 1.08)
    ax.set_aspect("equal")
    ax.set_xlabel("Re")
    ax.set_ylabel("Im")
    ax.set_title(title, fontsize=8)


def draw_coefficient_histograms(ax, run: RunDiagnostics, layer: str, norm) -> None:
    """The distribution of |a_t| over the held-out windows, one line per measured epoch."""
    plt = _pyplot()
    measured = [(0, run.summary["coef_init"][layer])] if layer in (
        run.summary.get("coef_init") or {}) else []
    measured += [(r["epoch"], r["diag_a"][layer]) for r in run.records if "diag_a" in r]
    for epoch, coefficients in _pick(measured, 6):
        hist = np.asarray(coefficients["hist"], dtype=float)
        edges = np.linspace(0.0, 1.0, len(hist) + 1)
        ax.stairs(hist, edges, color=plt.cm.viridis(norm(epoch)), label=f"epoch {epoch}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("|a_t|")
    ax.set_ylabel("fraction of (step, lane, channel)")
    moving = any(c["input_dependent"] for _, c in measured)
    ax.set_title(f"layer {layer[1:]}: |a_t| over held-out text"
                 + (" (a_t depends on the input)" if moving else " (a_t = lambda)"), fontsize=8)
    ax.legend(fontsize=6)


def plot_lambdas(runs: list[RunDiagnostics], path: str | Path) -> Path:
    """Each run's eigenvalues over training (lambda_history), coloured by epoch: a row of unit
    disks, one per layer, and for a diagonal recurrence a row of |a_t| histograms below."""
    plt = _pyplot()
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    histories = [lambda_history(run) for run in runs]
    rows = []  # (run, history, what, diagonal)
    for run, (history, what) in zip(runs, histories):
        diagonal = any("diag_a" in r for r in run.records)
        rows.append((run, history, what, diagonal))
    columns = max([len(h[-1][1]) if h else 1 for h, _ in histories] + [1])
    height = sum(2 if diagonal else 1 for *_, diagonal in rows)
    fig, axes = plt.subplots(height, columns, figsize=(3.6 * columns + 0.8, 3.7 * height),
                             squeeze=False)
    row = 0
    for run, history, what, diagonal in rows:
        epochs = [epoch for epoch, _ in history] or [0]
        norm = Normalize(vmin=min(epochs), vmax=max(max(epochs), min(epochs) + 1))
        panels = list(history[-1][1]) if history else []
        for c in range(columns):
            ax = axes[row, c]
            if c >= len(panels):
                ax.set_axis_off()
                continue
            layer = f", layer {panels[c][1:]}" if panels[c] else ""
            draw_lambda_disk(ax, history, panels[c], f"{run.label}{layer}\n{what}", norm)
            if diagonal:
                draw_coefficient_histograms(axes[row + 1, c], run, panels[c], norm)
        if diagonal:
            for c in range(len(panels), columns):
                axes[row + 1, c].set_axis_off()
        mappable = plt.cm.ScalarMappable(norm=norm, cmap="viridis")
        if panels:  # beside the row's last disk (one axes: tight_layout keeps its place)
            bar = fig.colorbar(mappable, ax=axes[row, len(panels) - 1], shrink=0.8,
                               label="epoch (0: initialisation)")
            bar.locator = MaxNLocator(integer=True)
            bar.update_ticks()
        row += 2 if diagonal else 1
    return _save(fig, path)


def segments(norms: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) stretches of steps joined by gradient: the chain is cut between t-1 and t
    when no loss at s >= t sends any gradient to h_{t-1}."""
    n = norms.shape[0]
    cuts = [t for t in range(1, n) if not (norms[t:, t - 1] > 0).any()]
    edges = [0, *cuts, n]
    return list(zip(edges[:-1], edges[1:]))


def _strategy(summary: dict) -> str:
    if summary["truncation"] == "randomized":
        return f"randomized, pi={summary['truncation_pi']:g}"
    return summary["truncation"]


def draw_truncation_strips(ax, runs: list[RunDiagnostics]) -> None:
    """D2L fig. 8.7.1 from real runs: each strategy's text cut into the stretches that
    gradient actually crossed (alternating shades), window boundaries as ticks."""
    for row, run in enumerate(runs):
        pattern = run.summary.get("pattern")
        if not pattern:
            continue
        y = len(runs) - 1 - row
        for k, (a, b) in enumerate(segments(np.asarray(pattern["norms"], dtype=float))):
            ax.barh(y, b - a, left=a - 0.5, height=0.6,
                    color="tab:orange" if k % 2 else "tab:blue", edgecolor="white")
        for e in np.cumsum(pattern["lengths"])[:-1] - 0.5:
            ax.plot([e, e], [y - 0.42, y + 0.42], color="black", linewidth=1.5)
    ax.set_yticks(range(len(runs)))
    ax.set_yticklabels([_strategy(r.summary) for r in reversed(runs)])
    ax.set_xlabel("token position (lane 0, three consecutive training batches); "
                  "black ticks: batch boundaries")
    ax.set_title("stretches of text that gradient crossed (a new shade = the chain was cut)",
                 fontsize=9)


def plot_truncation_patterns(runs: list[RunDiagnostics], path: str | Path) -> Path:
    """Heatmaps of ||dl_s/dh_t|| side by side, above the D2L-style strips of all runs."""
    plt = _pyplot()
    fig = plt.figure(figsize=(5.2 * len(runs), 4.2 + 0.5 * len(runs) + 0.8))
    grid = fig.add_gridspec(2, len(runs), height_ratios=[4.2, 0.5 * len(runs) + 0.8])
    for i, run in enumerate(runs):
        draw_truncation_pattern(fig.add_subplot(grid[0, i]), run, fig)
    draw_truncation_strips(fig.add_subplot(grid[1, :]), runs)
    return _save(fig, path)


def _save(fig, path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        ensure_directory(path.parent)
        fig.tight_layout()
        write_atomic(path, lambda f: fig.savefig(f, dpi=80, format="png"))
    finally:
        plt.close(fig)
    return path
