"""metrics.jsonl, the run's log: one JSON object per epoch and one for the test split.

Its key names are a public interface (plots, compare, the notebook API and users' own scripts
read them): keep them stable.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only named: reading a log (compare, the notebook API) needs no torch
    from rnnlm.training.epoch import EpochResult

METRICS_FILE = "metrics.jsonl"  # in out_dir


def read_records(out_dir: str | Path) -> list[dict]:
    """The records of the metrics.jsonl in `out_dir`, in order (empty when it has none)."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def epoch_record(epoch: int, step: int, result: EpochResult, lr: float, wall_s: float) -> dict:
    """The record of the epoch with index `epoch` (so "epoch" counts completed epochs), `step`
    optimizer steps into the run; validation and diagnostics add their keys to it."""
    return {
        "epoch": epoch + 1, "step": step,
        "train_loss": result.loss, "train_ppl": result.ppl,
        "train_bpc": result.loss / math.log(2),
        "tokens_per_s": result.tokens_per_s, "grad_norm": result.grad_norm,
        "clipped_frac": result.clipped_frac, "lr": lr,
        "epoch_s": result.seconds, "wall_s": wall_s,
        "tokens": result.tokens,
    }


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended as the run goes."""

    def __init__(self, path: Path, append: bool = False):
        self.path = path
        if not append:
            path.write_text("")

    def keep_epochs(self, last_epoch: int) -> None:
        """Drop records after `last_epoch` (epochs a resumed run is about to redo, written
        after the checkpoint it resumes from), so every epoch appears once."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["epoch"] <= last_epoch:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a killed process
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
