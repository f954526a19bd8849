"""metrics.jsonl, the run's log: one JSON object per epoch and one for the test split.

Its key names are a public interface (plots, compare, the notebook API and users' own scripts
read them): keep them stable.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from rnnlm.errors import ConfigError
from rnnlm.files import append_text, write_atomic

if TYPE_CHECKING:  # only named: reading a log (compare, the notebook API) needs no torch
    from rnnlm.training.epoch import EpochResult

METRICS_FILE = "metrics.jsonl"  # in out_dir


def read_records(out_dir: str | Path) -> list[dict]:
    """The records of the metrics.jsonl in `out_dir`, in order (empty when it has none).
    A last line cut short (a process killed while writing it) is left out; a damaged line
    before it is a ConfigError naming the line."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                break
            raise ConfigError(f"{path} line {number} is not a JSON record: the log is "
                              f"damaged") from None
    return records


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
            write_atomic(path, b"")

    def keep_epochs(self, last_epoch: int) -> None:
        """Drop records after `last_epoch` (epochs a resumed run is about to redo, written
        after the checkpoint it resumes from), so every epoch appears once."""
        if not self.path.exists():
            return
        text = self.path.read_text(encoding="utf-8")
        kept = []
        for line in text.splitlines():
            try:
                if json.loads(line)["epoch"] <= last_epoch:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a killed process
        if "".join(kept) != text:  # rewritten only when something goes
            write_atomic(self.path, "".join(kept))

    def write(self, record: dict) -> None:
        line = json.dumps(_json_numbers(record), allow_nan=False)  # NaN is not JSON: null
        append_text(self.path, line + "\n")  # a failed append is cut off again


def _json_numbers(value):
    """`value` (a record, and the lists and dicts in it) with NaN and infinite floats as None,
    written `null`: json.dumps would write NaN and Infinity, which no JSON reader but
    Python's accepts."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _json_numbers(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_numbers(item) for item in value]
    return value
