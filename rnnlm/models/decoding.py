"""Fast one-token-at-a-time inference for generation: the decoders models hand out.

Training runs whole windows; generation runs one step per character, where the cost is op
count and memory traffic, not FLOPs. Every model gives its own decoder
(`LanguageModel.decoder()`), so generation runs the very functions the model trains with:

- `Decoder`, every model's default: the model itself on a window of one token.
- `PreparedDecoder`, for cores that step through time with a cell function (the scratch
  models): each layer's own cell on weights prepared once (contiguous transposed matrices,
  the first layer's input projection of every token as a table), so that a step is a table
  row, the cell's handful of ops per layer and one output matmul, with no autograd.

This module knows no model kind: what it needs from a model is the contract of base.py and,
for `PreparedDecoder`, the layers the model passes in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # base.py imports this module: no import of it at run time
    from rnnlm.models.base import LanguageModel, State


class Decoder:
    """step(token_id) -> logits (1, V), advancing an internal state (batch of one).

    The model itself on a window of one token. Building a decoder puts the model in eval
    mode (decoding is inference: no dropout); the caller restores the mode it wants.
    """

    def __init__(self, model: LanguageModel):
        model.eval()
        self.model = model
        self.state: State = model.begin_state(1)
        self.device = model.output.weight.device

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """Run a whole prefix (1-D ids) as one window; logits of its last position (1, V)."""
        logits, self.state = self.model(ids.view(1, -1).to(self.device), self.state)
        return logits[-1]

    @torch.no_grad()
    def step(self, token_id: int) -> torch.Tensor:
        token = torch.tensor([[token_id]], device=self.device)
        logits, self.state = self.model(token, self.state)
        return logits[-1]


class PreparedDecoder(Decoder):
    """A step-by-step core on prepared weights, one layer after another.

    `layers` are the model's own recurrent layers; each gives its `cell(xw_t, state, w_hh,
    b_hh) -> next state` (the function training steps through, so the activation and the
    gates cannot differ from the model's), `project_input` (the first layer's input path),
    `recurrent_weight()`, `weight_ih`, `bias_ih` and `bias_hh`, in torch.nn's layout.
    A step is one table row for the first layer's input, per layer one input matmul (above
    the first) and the cell, then one output matmul: no autograd, no stacking of per-layer
    states between steps.
    """

    def __init__(self, model: LanguageModel, layers):
        super().__init__(model)
        with torch.no_grad():
            self.cells = [layer.cell for layer in layers]
            # The cells compute h W_hh^T; handing them the transpose of a contiguous W_hh^T
            # makes that product read a contiguous (in, out) matrix, the fast layout for a
            # one-row matmul.
            self.w_hh = [layer.recurrent_weight().t().contiguous().t() for layer in layers]
            self.b_hh = [layer.bias_hh.detach() for layer in layers]
            self.w_ih = [layer.weight_ih.t().contiguous() for layer in layers]
            self.b_ih = [layer.bias_ih.detach() for layer in layers]
            # Every token's first-layer input projection through the model's own input path
            # (one-hot gather or embedding): (V, G*H). One (1, G*H) view per token, so a step
            # costs a list lookup instead of a slicing op.
            every_token = torch.arange(model.vocab_size, device=self.device).view(-1, 1)
            self.table = layers[0].project_input(model.encode(every_token))[0]
            self.rows = list(self.table.split(1))
            self.w_out = model.output.weight.t().contiguous()
            self.b_out = model.output.bias.detach()
        self.layer_states = [tuple(s[k] for s in self.state) for k in range(len(self.cells))]

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        self.state = tuple(torch.stack(parts) for parts in zip(*self.layer_states))
        logits = super().feed(ids)
        self.layer_states = [tuple(s[k] for s in self.state) for k in range(len(self.cells))]
        return logits

    def step(self, token_id: int) -> torch.Tensor:
        # No no_grad context per call (it costs as much as an op): every tensor used here
        # was prepared without gradient tracking, so nothing is recorded anyway.
        x = None
        for k, state in enumerate(self.layer_states):
            xw = self.rows[token_id] if k == 0 else torch.addmm(self.b_ih[k], x, self.w_ih[k])
            state = self.layer_states[k] = self.cells[k](xw, state, self.w_hh[k], self.b_hh[k])
            x = state[0]
        return torch.addmm(self.b_out, x, self.w_out)
