"""CUDA graphs for the training forward and backward of a model (`train.cuda_graphs`).

A window of a scratch model is hundreds of tiny kernels (a few per time step, forward and
backward); on a GPU the time goes to launching them, not running them. Capturing the
model's forward and backward once as CUDA graphs (torch.cuda.make_graphed_callables) and
replaying them turns those launches into two. Shapes must stay fixed, so a batch of another
shape (e.g. variable-length truncation) simply runs the ordinary eager model.
"""

from __future__ import annotations

import torch
from torch import nn

from rnnlm.models import LanguageModel, State


class _Flat(nn.Module):
    """The model with flat tensor inputs and outputs, as graph capture needs them."""

    def __init__(self, model: LanguageModel):
        super().__init__()
        self.model = model

    def forward(self, tokens, *state):
        logits, new_state = self.model(tokens, tuple(state))
        return (logits, *new_state)


class GraphedModel(nn.Module):
    """Wraps a model for training: same contract, forward/backward replayed from graphs for
    batches of the captured shape."""

    def __init__(self, model: LanguageModel, batch_size: int, num_steps: int):
        super().__init__()
        self.model = model
        self.output = model.output  # begin_state and helpers look for the output layer
        device = model.output.weight.device
        tokens = torch.zeros(batch_size, num_steps, dtype=torch.long, device=device)
        state = model.begin_state(batch_size)
        self.shape = tuple(tokens.shape)
        was_training = model.training
        model.train()
        self.graphed = torch.cuda.make_graphed_callables(_Flat(model), (tokens, *state))
        model.train(was_training)

    def begin_state(self, batch_size: int) -> State:
        return self.model.begin_state(batch_size)

    def forward(self, tokens, state: State, xi=None):
        if xi is not None:  # randomized truncation: xi changes the backward of every batch
            return self.model(tokens, state, xi=xi)
        if tuple(tokens.shape) != self.shape or not self.training:
            return self.model(tokens, state)
        logits, *new_state = self.graphed(tokens, *(s.detach() for s in state))
        return logits, tuple(new_state)
