"""The best so far: what a run remembers about its best epoch, in one object.

Three things follow the best epoch, each for its own purpose:

* the tracked metric (validation perplexity when the epoch has one, else training
  perplexity), which decides when best.pt is written;
* early stopping, which counts evaluations without a better validation perplexity;
* the weights with the lowest validation perplexity, kept in memory to score the test split
  (best.pt is their twin on disk).

`BestSoFar` holds all three and saves them under the checkpoint keys they have always had
(`best`, `run_state["early_stop"]`, `run_state["best_weights"]`), so a resumed run takes the
same decisions as an uninterrupted one and checkpoints of older versions still resume.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def tracked_metric(record: dict) -> tuple[str, float]:
    """The number best.pt follows: validation perplexity when the epoch has one, else
    training perplexity. Lower is better."""
    if record.get("val_ppl") is not None:
        return "val_ppl", float(record["val_ppl"])
    return "train_ppl", float(record["train_ppl"])


def improves(best: dict | None, record: dict) -> bool:
    """Whether this epoch beats the best so far. Validation outranks training perplexity:
    the first validated epoch always counts, and epochs without validation never beat it."""
    name, value = tracked_metric(record)
    if not np.isfinite(value):
        return False
    if best is None:
        return True
    if name != best["metric"]:
        return name == "val_ppl"
    return value < best["value"]


class EarlyStopping:
    """Stop once validation perplexity has not improved for `patience` evaluations in a row
    (None: never). Epochs without evaluation do not count."""

    def __init__(self, patience: int | None):
        self.patience = patience
        self.best = math.inf
        self.bad_evaluations = 0

    def should_stop(self, val_ppl: float) -> bool:
        """Record one evaluation; True when the patience has run out."""
        if val_ppl < self.best:
            self.best, self.bad_evaluations = val_ppl, 0
        else:
            self.bad_evaluations += 1
        return self.patience is not None and self.bad_evaluations >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_evaluations": self.bad_evaluations}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_evaluations = float(state["best"]), int(state["bad_evaluations"])


class BestWeights:
    """An in-memory copy of the weights that scored the lowest validation perplexity."""

    def __init__(self):
        self.ppl = math.inf
        self.epoch: int | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def offer(self, ppl: float, epoch: int, model: torch.nn.Module) -> bool:
        if not ppl < self.ppl:
            return False
        self.ppl, self.epoch = ppl, epoch
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return True

    def state_dict(self) -> dict:
        return {"ppl": self.ppl, "epoch": self.epoch, "weights": self.state}

    def load_state_dict(self, state: dict) -> None:
        self.ppl, self.epoch, self.state = float(state["ppl"]), state["epoch"], state["weights"]


class BestSoFar:
    """The tracked metric (`metric`: {"metric", "value", "epoch"} or None before the first
    epoch), early stopping (`stopper`) and the best validation weights (`weights`)."""

    def __init__(self, patience: int | None):
        self.metric: dict | None = None
        self.stopper = EarlyStopping(patience)
        self.weights = BestWeights()

    def validated(self, val_ppl: float, epoch: int, model: torch.nn.Module) -> bool:
        """Take one validation of `model` after `epoch` epochs: keep its weights when they
        are the best yet. Returns whether early stopping ends the run here."""
        self.weights.offer(val_ppl, epoch, model)
        return self.stopper.should_stop(val_ppl)

    def improved_by(self, record: dict) -> bool:
        """Whether the epoch of `record` (complete, validation included) is the best yet by
        the tracked metric; it becomes the best when it is."""
        if not improves(self.metric, record):
            return False
        metric, value = tracked_metric(record)
        self.metric = {"metric": metric, "value": value, "epoch": record["epoch"]}
        return True

    def state_dicts(self) -> dict:
        """What a checkpoint's run_state keeps of the best so far (its `best` is `metric`)."""
        return {"early_stop": self.stopper.state_dict(),
                "best_weights": self.weights.state_dict()}

    def restore(self, best: dict | None, run_state: dict | None) -> None:
        """Continue from a checkpoint's `best` and `run_state`. Checkpoints of older versions
        have no run_state (or parts of it): those parts start afresh."""
        self.metric = best
        run_state = run_state or {}
        if run_state.get("early_stop"):
            self.stopper.load_state_dict(run_state["early_stop"])
        if run_state.get("best_weights"):
            self.weights.load_state_dict(run_state["best_weights"])
