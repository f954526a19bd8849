"""Diagnostics of one run: per-epoch keys for metrics.jsonl, then diagnostics.json + a plot.

``DiagnosticsRecorder`` is what the trainer drives when ``train.diagnostics`` is on;
``write_summary`` is shared with ``diagnose.py`` (a checkpoint measured after the fact).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from rnnlm.bptt.truncation import Truncation, variable_length_of
from rnnlm.checkpoint import load_checkpoint, model_from_checkpoint
from rnnlm.config import ConfigError, config_from_dict, parse_override
from rnnlm.data.corpus import load_corpus
from rnnlm.data.iterators import BatchIterator
from rnnlm.data.splits import split_ids
from rnnlm.diagnostics.gradients import (
    coefficient_summary,
    complex_pairs,
    diagnostic_batch,
    eigenvalues,
    epoch_record,
    significant,
    truncation_pattern,
)
from rnnlm.diagnostics.plots import (
    MEASURED_KEYS,
    MEASURED_PREFIX,
    PLOT_FILE,
    SUMMARY_FILE,
    load_run,
    plot_run,
)
from rnnlm.files import ensure_directory, write_atomic
from rnnlm.models import LanguageModel

PATTERN_BATCHES = 3  # consecutive training batches drawn in the truncation pattern
HELDOUT_WINDOWS = 32  # windows of held-out text over which diag_a measures the coefficients


def heldout_windows(ids: np.ndarray, cfg, count: int = HELDOUT_WINDOWS) -> torch.Tensor:
    """Up to `count` consecutive windows (count, num_steps) of the validation split, where the
    configuration has one long enough (ids: the whole token stream, as the corpus holds it),
    else of the text's start, as the gradient measurement takes them."""
    T = cfg.data.num_steps
    part = split_ids(ids, cfg.data.split).val if cfg.data.split is not None else None
    if part is None or len(part) < T + 1:
        part = ids
    return diagnostic_batch(part, max(1, min(count, (len(part) - 1) // T)), T)[0]


def pattern_windows(batches: BatchIterator, truncation: Truncation, epoch: int,
                    count: int = PATTERN_BATCHES, dtype=torch.float32):
    """The first `count` batches of `epoch`, lane 0, with the xi the trainer drew for them."""
    windows = []
    for b, (X, Y) in enumerate(batches.epoch(epoch)):
        if b == count:
            break
        windows.append((X[:1], Y[:1], truncation.xi(epoch, b, X.shape[1], dtype=dtype)))
    return windows


def write_summary(out_dir: Path, model: LanguageModel, cfg, epoch: int, windows,
                  carry_state: bool, eig_init: dict | None, measured: dict | None = None,
                  coef_init: dict | None = None) -> Path:
    """diagnostics.json (final eigenvalues, truncation pattern; for a checkpoint measured
    after the fact its record of diag_* keys, `measured`; for a diagonal recurrence trained
    with diagnostics its coefficients at initialisation) and diagnostics.png in out_dir;
    returns the plot's path."""
    norms = truncation_pattern(model, windows, carry_state)
    xis = [xi for _, _, xi in windows]
    summary = {
        "kind": cfg.model.kind, "hidden_size": cfg.model.hidden_size,
        "num_layers": cfg.model.num_layers, "activation": cfg.model.activation,
        "truncation": cfg.train.truncation, "truncation_pi": cfg.train.truncation_pi,
        "num_steps": cfg.data.num_steps, "epoch": epoch,
        "eig_init": None if eig_init is None else
        {name: complex_pairs(ev) for name, ev in eig_init.items()},
        "eig_final": {name: complex_pairs(ev) for name, ev in eigenvalues(model).items()},
        "pattern": {
            "epoch": epoch, "carry_state": carry_state,
            "lengths": [int(X.shape[1]) for X, _, _ in windows],
            "xi": None if all(x is None for x in xis) else [x.tolist() for x in xis],
            "norms": [significant(row, 4) for row in norms],
        },
    }
    if measured is not None:
        summary["gnorm"], summary["gnorm_last"] = measured["diag_gnorm"], \
            measured["diag_gnorm_last"]
        summary.update({key: measured[key] for key in MEASURED_KEYS if key in measured})
    if coef_init is not None:
        summary["coef_init"] = coef_init
    out_dir = Path(out_dir)
    ensure_directory(out_dir)
    write_atomic(out_dir / SUMMARY_FILE, json.dumps(summary))
    return plot_run(load_run(out_dir), out_dir / PLOT_FILE)


class DiagnosticsRecorder:
    """Measures the model every `train.diagnostics_every` epochs and at the end of training."""

    def __init__(self, cfg, model: LanguageModel, ids: np.ndarray, batches: BatchIterator,
                 truncation: Truncation, out_dir: Path):
        self.cfg, self.batches, self.truncation = cfg, batches, truncation
        self.out_dir = Path(out_dir)
        self.X, self.Y = diagnostic_batch(ids, cfg.data.batch_size, cfg.data.num_steps)
        self.heldout = heldout_windows(ids, cfg)
        # before the first step: where training starts (after a resume: the checkpoint)
        self.eig_init = eigenvalues(model)
        self.coef_init = coefficient_summary(model, self.heldout)  # None for a dense W_hh

    def epoch_record(self, model: LanguageModel, epoch: int) -> dict:
        """diag_* keys for this epoch's metrics record ({} when not due)."""
        every, last = self.cfg.train.diagnostics_every, self.cfg.train.epochs
        if (epoch + 1) % every and epoch + 1 != last:
            return {}
        return epoch_record(model, self.X, self.Y, self.heldout)

    def finish(self, model: LanguageModel, epoch: int) -> Path:
        """Truncation pattern of the last epoch's first batches, diagnostics.json, the plot."""
        windows = pattern_windows(self.batches, self.truncation, epoch,
                                  dtype=model.output.weight.dtype)
        return write_summary(self.out_dir, model, self.cfg, epoch + 1, windows,
                             self.batches.carries_state, self.eig_init,
                             coef_init=self.coef_init)


def measure_checkpoint_model(model: LanguageModel, cfg, ids: np.ndarray, out_dir: Path,
                             epoch: int) -> tuple[Path, dict]:
    """diagnose.py's work: every measurement on a trained model, written into out_dir."""
    X, Y = diagnostic_batch(ids, cfg.data.batch_size, cfg.data.num_steps)
    record = epoch_record(model, X, Y, heldout_windows(ids, cfg))
    batches = BatchIterator(ids, cfg.data.batch_size, cfg.data.num_steps, cfg.data.iterator,
                            seed=cfg.seed, variable_length=variable_length_of(cfg.train))
    truncation = Truncation.from_config(cfg)
    # the pattern of the checkpoint's last epoch, as training drew it (epoch is 1-based)
    windows = pattern_windows(batches, truncation, max(epoch - 1, 0),
                              dtype=model.output.weight.dtype)
    plot = write_summary(out_dir, model, cfg, epoch, windows, batches.carries_state, None,
                         measured=record)
    return plot, record


def load_checkpoint_model(path: str | Path, overrides=()):
    """(model, config, vocab, epoch) from a training checkpoint (rnnlm.checkpoint). `--set`
    overrides may point the config at the corpus (data.*), never change the model."""
    for item in overrides:
        key, _ = parse_override(item)
        if key.startswith("model."):
            raise ConfigError(f"--set {item}: rnnlm diagnose measures the model saved in {path}; "
                              f"its model.* settings cannot change")
    ckpt = load_checkpoint(path)
    model, vocab, _, _ = model_from_checkpoint(ckpt, torch.device("cpu"), str(path))
    cfg = config_from_dict(ckpt["config"], overrides, source=str(path))
    return model, cfg, vocab, int(ckpt["progress"]["epoch"])


def diagnose_checkpoint(path: str | Path, out_dir: str | Path | None = None,
                        overrides=()) -> tuple[Path, dict]:
    """Measure a saved model on its own corpus; returns the plot's path and the diag_* keys.
    The results go into out_dir (default: diagnose-<name> beside the checkpoint), never over
    the training run's own diagnostics."""
    model, cfg, vocab, epoch = load_checkpoint_model(path, overrides)
    corpus = load_corpus(cfg.data)
    if corpus.vocab != vocab:
        raise ConfigError(f"checkpoint {path} was trained with another vocabulary than its "
                          f"corpus ({corpus.source}) gives now: point --set data.path or "
                          f"data.data_dir at the text it was trained on")
    path = Path(path)
    out_dir = Path(out_dir) if out_dir else path.parent / f"{MEASURED_PREFIX}{path.stem}"
    return measure_checkpoint_model(model, cfg, corpus.ids, out_dir, epoch)


def format_record(record: dict) -> str:
    """A short human summary of one diagnostics record (diagnose.py prints it)."""
    total, last = record["diag_gnorm"], record["diag_gnorm_last"]
    lines = [f"||dL/dh_t|| (window loss) at distance 0 / {len(total) // 2} / {len(total) - 1}:"
             f" {total[0]:.3g} / {total[len(total) // 2]:.3g} / {total[-1]:.3g}",
             f"||dl_T/dh_t|| (last step's loss) at the same distances: "
             f"{last[0]:.3g} / {last[len(last) // 2]:.3g} / {last[-1]:.3g}",
             "spectral radius of W_hh: " + ", ".join(
                 f"{name} {rho:.3f}" for name, rho in record["diag_rho"].items())]
    if "diag_a" in record:
        lines.append("largest |a_t| on held-out text: " + ", ".join(
            f"{name} {a['max']:.4f}" + (" (input-dependent)" if a["input_dependent"] else "")
            for name, a in record["diag_a"].items()))
    return "\n".join(lines)
