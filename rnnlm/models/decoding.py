"""Fast one-token-at-a-time inference for cores that step through time with a cell function.

Training runs whole windows; generation runs one step per character, where the cost is op
count and memory traffic, not FLOPs. Every model hands out its own decoder
(`LanguageModel.decoder()`, whose default, `base.Decoder`, runs the model on a window of one
token). `PreparedDecoder` is what the scratch models hand out: each layer's own cell on
weights prepared once (contiguous transposed matrices, the first layer's input projection of
every token as a table), so that a step is a table row, the cell's handful of ops per layer
and one output matmul, with no autograd; generation runs the very functions the model trains
with.

This module knows no model kind: what it needs is the contract of base.py and the layers the
model passes in.
"""

from __future__ import annotations

import torch

from rnnlm.models.base import Decoder, LanguageModel


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
