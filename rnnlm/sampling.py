"""Text generation: warm the state on a prefix, then pick one character at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from rnnlm.models import LanguageModel

Picker = Callable[[torch.Tensor], torch.Tensor]  # logits (N, V) -> ids (N,)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


@torch.no_grad()
def generate(model: LanguageModel, prefix_ids: torch.Tensor, num_chars: int,
             pick: Picker = greedy) -> Iterator[int]:
    """Yield `num_chars` new token ids after `prefix_ids` (1-D, at least one id).

    D2L's predict_ch8 feeds the prefix one token at a time; feeding it as one window gives
    the same state (the recurrence is identical), in one call instead of len(prefix).
    """
    was_training = model.training
    model.eval()
    try:
        device = model.output.weight.device
        state = model.begin_state(1)
        logits, state = model(prefix_ids.view(1, -1).to(device), state)
        for _ in range(num_chars):
            token = pick(logits[-1])  # (1,)
            yield int(token)
            logits, state = model(token.view(1, 1), state)
    finally:
        model.train(was_training)


def predict_greedy(model: LanguageModel, vocab, prefix_ids, num_chars: int) -> str:
    """D2L's predict_ch8: the prefix followed by its greedy continuation."""
    ids = torch.as_tensor(prefix_ids, dtype=torch.long)
    new = list(generate(model, ids, num_chars))
    return vocab.decode(ids.tolist() + new)
