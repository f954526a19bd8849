"""Held-out evaluation: one pass over a split with the state carried, no gradients.

The split is read in `lanes` contiguous pieces (sizes differ by at most one token), all
lanes advancing together window by window; the state starts at zero in each lane and is
carried to its end. Every token of a lane but the first is predicted once, so a split of m
tokens in k lanes gives m - k predictions, and the loss is their mean cross-entropy: the
perplexity of a model that predicts the uniform distribution is exactly the vocabulary size.
With one lane the result does not depend on the window length (up to float rounding).

Several models score as an ensemble: each token's probability is the mean of the models'
probabilities (each model carries its own state), and the loss is -log of that mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rnnlm.models import LanguageModel

EVAL_WINDOW = 256  # steps per forward call; only speed depends on it


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy per predicted token (nats)
    tokens: int  # number of predicted tokens

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bpc(self) -> float:
        return self.loss / math.log(2)

    def as_record(self, prefix: str) -> dict:
        return {f"{prefix}_loss": self.loss, f"{prefix}_ppl": self.ppl,
                f"{prefix}_bpc": self.bpc, f"{prefix}_tokens": self.tokens}


def lane_bounds(n: int, lanes: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and length of each of `lanes` contiguous lanes covering n tokens."""
    sizes = np.full(lanes, n // lanes, dtype=np.int64)
    sizes[: n % lanes] += 1
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return starts, sizes


def evaluate(model: LanguageModel, ids: np.ndarray, lanes: int, device: torch.device,
             window: int = EVAL_WINDOW) -> EvalResult:
    """Mean cross-entropy of `model` over the 1-D token array `ids` (see the module doc)."""
    return _score([model], ids, lanes, device, window)[0][0]


def evaluate_ensemble(models: Sequence[LanguageModel], ids: np.ndarray, lanes: int,
                      device: torch.device, window: int = EVAL_WINDOW
                      ) -> tuple[list[EvalResult], EvalResult]:
    """Each model's result and the ensemble's (the mean of their probabilities), in one pass."""
    return _score(list(models), ids, lanes, device, window)


@torch.no_grad()
def _score(models: list[LanguageModel], ids: np.ndarray, lanes: int, device: torch.device,
           window: int) -> tuple[list[EvalResult], EvalResult]:
    n = len(ids)
    if n < 2 * lanes:
        raise ValueError(f"{n} tokens cannot fill {lanes} lanes of at least two tokens")
    starts, sizes = lane_bounds(n, lanes)
    length = int(sizes.max())
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        states = [m.begin_state(lanes) for m in models]
        # per-member loss sums, then the ensemble's
        loss_sums = torch.zeros(len(models) + 1, dtype=torch.float64, device=device)
        count = 0
        for s in range(0, length - 1, window):
            pos = s + np.arange(min(window, length - 1 - s) + 1)  # inputs and one more
            index = np.minimum(starts[:, None] + pos, n - 1)  # a short lane repeats its end
            tokens = torch.from_numpy(np.asarray(ids[index], dtype=np.int64)).to(device)
            valid = torch.from_numpy(pos[1:] < sizes[:, None]).to(device)  # (lanes, w)
            targets = tokens[:, 1:].t().reshape(-1)
            losses = []
            for k, m in enumerate(models):
                logits, states[k] = m(tokens[:, :-1], states[k])  # (w, lanes, V)
                losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets,
                                              reduction="none").double())
            losses = torch.stack(losses)
            # -log of the mean probability; with one model exactly its own loss
            together = losses[0] if len(models) == 1 else \
                math.log(len(models)) - torch.logsumexp(-losses, 0)
            loss_sums += (torch.cat([losses, together[None]]) * valid.t().reshape(-1)).sum(1)
            count += int(valid.sum())
    finally:
        for m, training in zip(models, was_training, strict=True):
            m.train(training)
    results = [EvalResult(loss=total / count, tokens=count) for total in loss_sums.tolist()]
    return results[:-1], results[-1]

