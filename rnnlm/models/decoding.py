"""Fast one-token-at-a-time inference for generation.

Training runs whole windows; generation runs one step per character, where the cost is op
count and memory traffic, not FLOPs. `make_decoder` prepares everything that does not change
between steps once (contiguous transposed weights, the one-hot input table W_ih^T + b_ih) so
that a scratch-model step is a handful of ops with no autograd. torch.nn models simply call
their layer with a window of one token.
"""

from __future__ import annotations

import torch

from rnnlm.models import LanguageModel, State
from rnnlm.models.scratch import ScratchGRU, ScratchLM, ScratchLSTM, ScratchRNN, gru_cell


class Decoder:
    """step(token_id) -> logits (1, V), advancing an internal state (batch of one)."""

    def __init__(self, model: LanguageModel):
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


def _rnn_step(xw, state, w_t, b_hh):
    return (torch.addmm(xw, state[0], w_t).tanh_(),)


def _lstm_step(xw, state, w_t, b_hh):
    h, c = state
    gates = torch.addmm(xw, h, w_t)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return (torch.sigmoid(o) * torch.tanh(c), c)


def _gru_step(xw, state, w_t, b_hh):
    return gru_cell(xw, state, w_t.t(), b_hh)  # gru_cell transposes back: w_t is what it uses


# RNN and LSTM add b_hh to the input projection (folded into the prepared table); the GRU's
# reset gate multiplies W_hn h + b_hn, so its cell keeps b_hh apart.
_STEPS = {ScratchRNN: (_rnn_step, True), ScratchGRU: (_gru_step, False),
          ScratchLSTM: (_lstm_step, True)}


class ScratchDecoder(Decoder):
    """The scratch cells on prepared weights: one table row, one matmul per layer for all
    gates against a contiguous (in, out) matrix, the cell's elementwise ops, one output
    matmul. No autograd, no stacking of per-layer states between steps."""

    def __init__(self, model: ScratchLM):
        super().__init__(model)
        self.cell, fold = _STEPS[type(model)]
        with torch.no_grad():
            self.w_hh = [layer.weight_hh.t().contiguous() for layer in model.layers]
            self.w_ih = [layer.weight_ih.t().contiguous() for layer in model.layers]
            self.b_in = [layer.bias_ih + layer.bias_hh if fold else layer.bias_ih.clone()
                         for layer in model.layers]
            self.b_hh = [layer.bias_hh.detach() for layer in model.layers]
            first_inputs = torch.eye(model.vocab_size, dtype=self.w_ih[0].dtype,
                                     device=self.device)
            if model.embedding is not None:
                first_inputs = model.embedding.weight
            self.table = torch.addmm(self.b_in[0], first_inputs, self.w_ih[0])  # (V, G*H)
            # one (1, G*H) view per token: a list lookup per step instead of a slicing op
            self.rows = list(self.table.split(1))
            self.w_out = model.output.weight.t().contiguous()
            self.b_out = model.output.bias.detach()
        self.layer_states = [tuple(s[k] for s in self.state) for k in range(len(model.layers))]

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        self.state = tuple(torch.stack(parts) for parts in zip(*self.layer_states))
        logits = super().feed(ids)
        self.layer_states = [tuple(s[k] for s in self.state) for k in range(len(self.w_hh))]
        return logits

    def step(self, token_id: int) -> torch.Tensor:
        # No no_grad context per call (it costs as much as an op): every tensor used here
        # was prepared without gradient tracking, so nothing is recorded anyway.
        x = None
        for k, state in enumerate(self.layer_states):
            xw = self.rows[token_id] if k == 0 else \
                torch.addmm(self.b_in[k], x, self.w_ih[k])
            state = self.layer_states[k] = self.cell(xw, state, self.w_hh[k], self.b_hh[k])
            x = state[0]
        return torch.addmm(self.b_out, x, self.w_out)


def make_decoder(model: LanguageModel) -> Decoder:
    model.eval()
    return ScratchDecoder(model) if isinstance(model, ScratchLM) else Decoder(model)
