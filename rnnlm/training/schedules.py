"""Learning-rate schedules, driven once per epoch.

The learning rate lives only in the optimizer's param_groups: the schedules are
torch.optim.lr_scheduler objects that write it there.

* none: constant.
* step: multiply by `lr_gamma` every `lr_step_size` epochs (StepLR).
* cosine: from `lr` down to `lr_min` over `epochs` epochs, half a cosine (CosineAnnealingLR).
* plateau: multiply by `lr_gamma` once validation perplexity has gone more than
  `plateau_patience` evaluations without improving, never below `lr_min` (ReduceLROnPlateau;
  epochs without evaluation do not count).

Early stopping, which counts evaluations the same way, belongs to the best so far
(rnnlm.training.best).
"""

from __future__ import annotations

import torch
from torch.optim import lr_scheduler

from rnnlm.config import TrainConfig


class LRSchedule:
    def __init__(self, cfg: TrainConfig, optimizer: torch.optim.Optimizer):
        self.kind = cfg.lr_schedule
        self.scheduler = None
        if self.kind == "step":
            self.scheduler = lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step_size,
                                                 gamma=cfg.lr_gamma)
        elif self.kind == "cosine":
            self.scheduler = lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs,
                                                            eta_min=cfg.lr_min)
        elif self.kind == "plateau":
            self.scheduler = lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=cfg.lr_gamma, patience=cfg.plateau_patience,
                min_lr=cfg.lr_min)

    def after_epoch(self, val_ppl: float | None) -> None:
        """Call once at the end of every epoch, with the validation perplexity when the epoch
        was evaluated (plateau only moves on evaluations)."""
        if self.kind in ("step", "cosine"):
            self.scheduler.step()
        elif self.kind == "plateau" and val_ppl is not None:
            self.scheduler.step(val_ppl)

    def state_dict(self) -> dict:
        """What a checkpoint keeps so that a resumed run continues the same curve."""
        return {"kind": self.kind,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state_dict(self, state: dict | None) -> None:
        """Continue the saved schedule; a resume that switched train.lr_schedule starts the
        new kind afresh (another kind's state would not mean anything to it)."""
        if self.scheduler is not None and state and state.get("kind") == self.kind:
            self.scheduler.load_state_dict(state["scheduler"])

