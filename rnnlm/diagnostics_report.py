"""Diagnostics of one run: per-epoch keys for metrics.jsonl, then diagnostics.json + a plot.

``DiagnosticsRecorder`` is what the trainer drives when ``train.diagnostics`` is on;
``write_summary`` is shared with ``diagnose.py`` (a checkpoint measured after the fact).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from rnnlm.diagnostics import (
    complex_pairs,
    diagnostic_batch,
    eigenvalues,
    epoch_record,
    significant,
    truncation_pattern,
)
from rnnlm.diagnostics_plots import PLOT_FILE, SUMMARY_FILE, load_run, plot_run
from rnnlm.iterators import BatchIterator
from rnnlm.models import LanguageModel
from rnnlm.truncation import Truncation

PATTERN_BATCHES = 3  # consecutive training batches drawn in the truncation pattern


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
                  carry_state: bool, eig_init: dict | None, gnorms=None) -> Path:
    """diagnostics.json (final eigenvalues, truncation pattern, optional gradient norms) and
    diagnostics.png in out_dir; returns the plot's path."""
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
    if gnorms is not None:
        summary["gnorm"], summary["gnorm_last"] = gnorms
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (SUMMARY_FILE + ".tmp")
    tmp.write_text(json.dumps(summary), encoding="utf-8")
    tmp.replace(out_dir / SUMMARY_FILE)
    return plot_run(load_run(out_dir), out_dir / PLOT_FILE)


class DiagnosticsRecorder:
    """Measures the model every `train.diagnostics_every` epochs and at the end of training."""

    def __init__(self, cfg, model: LanguageModel, ids: np.ndarray, batches: BatchIterator,
                 truncation: Truncation, out_dir: Path):
        self.cfg, self.batches, self.truncation = cfg, batches, truncation
        self.out_dir = Path(out_dir)
        self.X, self.Y = diagnostic_batch(ids, cfg.data.batch_size, cfg.data.num_steps)
        self.eig_init = eigenvalues(model)  # before the first step: where training starts

    def epoch_record(self, model: LanguageModel, epoch: int) -> dict:
        """diag_* keys for this epoch's metrics record ({} when not due)."""
        every, last = self.cfg.train.diagnostics_every, self.cfg.train.epochs
        if (epoch + 1) % every and epoch + 1 != last:
            return {}
        return epoch_record(model, self.X, self.Y)

    def finish(self, model: LanguageModel, epoch: int) -> Path:
        """Truncation pattern of the last epoch's first batches, diagnostics.json, the plot."""
        windows = pattern_windows(self.batches, self.truncation, epoch,
                                  dtype=model.output.weight.dtype)
        return write_summary(self.out_dir, model, self.cfg, epoch + 1, windows,
                             self.batches.carries_state, self.eig_init)


def measure_checkpoint_model(model: LanguageModel, cfg, ids: np.ndarray, out_dir: Path,
                             epoch: int) -> tuple[Path, dict]:
    """diagnose.py's work: every measurement on a trained model, written into out_dir."""
    from rnnlm.truncation import variable_length_of

    X, Y = diagnostic_batch(ids, cfg.data.batch_size, cfg.data.num_steps)
    record = epoch_record(model, X, Y)
    batches = BatchIterator(ids, cfg.data.batch_size, cfg.data.num_steps, cfg.data.iterator,
                            seed=cfg.seed, variable_length=variable_length_of(cfg.train))
    truncation = Truncation.from_config(cfg)
    # the pattern of the epoch that would come next, as training would have drawn it
    windows = pattern_windows(batches, truncation, epoch, dtype=model.output.weight.dtype)
    plot = write_summary(out_dir, model, cfg, epoch, windows, batches.carries_state, None,
                         gnorms=(record["diag_gnorm"], record["diag_gnorm_last"]))
    return plot, record


def load_checkpoint_model(path: str | Path, overrides=()) -> tuple[LanguageModel, object, int]:
    """(model, config, epoch) from a checkpoint file: a dict with "config" (the resolved config
    as a dict), "model" (a state_dict) and optionally "epoch", loaded with weights_only."""
    from rnnlm.config import ConfigError, config_from_dict
    from rnnlm.models import build_model

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} not found: pass a file written by training")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file or one that needs more than weights_only
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"checkpoint {path} cannot be loaded safely: {first}") from None
    if not isinstance(raw, dict) or "config" not in raw or "model" not in raw:
        raise ConfigError(f"checkpoint {path} is not an rnnlm checkpoint (it needs the keys "
                          f"'config' and 'model')")
    cfg = config_from_dict(raw["config"], overrides, source=str(path))
    weights = raw["model"]
    vocab_size = weights["output.weight"].shape[0]
    model = build_model(cfg.model, vocab_size)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise ConfigError(f"checkpoint {path}: its weights do not fit model {cfg.model.kind} "
                          f"h={cfg.model.hidden_size}: {str(exc).splitlines()[0]}") from None
    return model, cfg, int(raw.get("epoch", 0))


def diagnose_checkpoint(path: str | Path, out_dir: str | Path | None = None,
                        overrides=()) -> tuple[Path, dict]:
    """Measure a saved model on its own corpus; returns the plot's path and the diag_* keys.
    The results go into out_dir (default: diagnose-<name> beside the checkpoint), never over
    the training run's own diagnostics."""
    from rnnlm.config import ConfigError
    from rnnlm.data import load_corpus

    model, cfg, epoch = load_checkpoint_model(path, overrides)
    corpus = load_corpus(cfg.data)
    if len(corpus.vocab) != model.vocab_size:
        raise ConfigError(f"checkpoint {path} has a vocabulary of {model.vocab_size} but its "
                          f"corpus ({corpus.source}) gives {len(corpus.vocab)}: point "
                          f"--set data.path/data.data_dir at the text it was trained on")
    path = Path(path)
    out_dir = Path(out_dir) if out_dir else path.parent / f"diagnose-{path.stem}"
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
    return "\n".join(lines)
