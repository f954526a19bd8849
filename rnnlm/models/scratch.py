"""From-scratch RNN, GRU and LSTM: the cell equations written out on nn.Parameters.

Weights use torch.nn's layout (gates stacked in rows: GRU r|z|n, LSTM i|f|g|o; separate
input and recurrent biases), so a scratch model and its torch.nn twin load the same numbers
and must agree to rounding. Each layer projects its whole input window in one matmul (a
gather of weight columns for one-hot input) and only the recurrent matmul runs per step.
Initialisation follows D2L's scratch models: weights N(0, 0.01^2), biases zero.

The GRU is PyTorch's variant, which applies the reset gate after the recurrent matmul,
r * (W_hn h + b_hn); D2L writes (r * h) W_hh. Both are GRUs; this one lets all three gates
share one recurrent matmul per step and has an exact torch.nn twin.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rnnlm.bptt.gated import gru_window, lstm_window
from rnnlm.bptt.rnn import manual_rnn_window, scale_grad
from rnnlm.models.base import Decoder, LanguageModel, State, Supports, drop
from rnnlm.models.decoding import PreparedDecoder


def rnn_cell(xw_t, state, w_hh, b_hh):
    (h,) = state
    return (torch.tanh(torch.addmm(xw_t + b_hh, h, w_hh.t())),)


def linear_rnn_cell(xw_t, state, w_hh, b_hh):
    """D2L 8.7's simplified RNN: no nonlinearity."""
    (h,) = state
    return (torch.addmm(xw_t + b_hh, h, w_hh.t()),)


def gru_cell(xw_t, state, w_hh, b_hh):
    (h,) = state
    gh = torch.addmm(b_hh, h, w_hh.t())
    xr, xz, xn = xw_t.chunk(3, dim=-1)
    hr, hz, hn = gh.chunk(3, dim=-1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (n + z * (h - n),)  # = (1 - z) * n + z * h


def lstm_cell(xw_t, state, w_hh, b_hh):
    h, c = state
    gates = torch.addmm(xw_t + b_hh, h, w_hh.t())
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return (h, c)


class LayerWeights(NamedTuple):
    """One recurrent layer's weights in torch.nn's layout, as its window uses them:
    weight_hh is the one the window runs with (after DropConnect, in training)."""

    weight_ih: torch.Tensor
    weight_hh: torch.Tensor
    bias_ih: torch.Tensor
    bias_hh: torch.Tensor


def project_input(x: torch.Tensor, weight_ih: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Input projection of a whole window plus `bias`: (T, B) ids or (T, B, I) -> (T, B, G*H)."""
    if x.dtype == torch.long:
        # One-hot input: x_t W^T + b is row x_t of (W^T + b), an embedding lookup. That
        # table is tiny (V x G*H), and F.embedding's backward beats indexing's on CPU.
        # W^T + b keeps W^T's column-major layout; gathering its rows strided is ~6x
        # slower than copying rows of a contiguous table (0.7 against 0.1 ms a batch).
        return F.embedding(x, (weight_ih.t() + bias).contiguous())
    return torch.matmul(x, weight_ih.t()) + bias


# Hand-written windows, one layer each, on any layer's weights (a ScratchLayer's, or a
# torch.nn layer's own parameters): (weights, x, state, xi, cell_kernel) -> (outputs, final
# state). RNN and LSTM add b_hh to the input projection once per window (it is additive
# there); the GRU keeps it apart because its reset gate multiplies W_hn h + b_hn.
def rnn_window(w: LayerWeights, x, state, xi=None, cell_kernel="auto", activation="tanh"):
    xw = project_input(x, w.weight_ih, w.bias_ih + w.bias_hh)
    hs = manual_rnn_window(xw, state[0], w.weight_hh, activation, xi, cell_kernel)
    return hs, (hs[-1],)


def gru_manual_window(w: LayerWeights, x, state, xi=None, cell_kernel="auto"):
    hs = gru_window(project_input(x, w.weight_ih, w.bias_ih), state[0], w.weight_hh,
                    w.bias_hh, xi, cell_kernel)
    return hs, (hs[-1],)


def lstm_manual_window(w: LayerWeights, x, state, xi=None, cell_kernel="auto"):
    xw = project_input(x, w.weight_ih, w.bias_ih + w.bias_hh)
    hs, c = lstm_window(xw, state[0], state[1], w.weight_hh, xi, cell_kernel)
    return hs, (hs[-1], c)


class ScratchLayer(nn.Module):
    """One recurrent layer: parameters and the loop over time.

    `window` (optional) runs the whole window with a hand-written backward; without it the
    layer steps through time with `cell` and autograd records every op. Both take xi
    (randomized truncation: step t's d(state_t)/d(state_{t-1}) scaled by xi[t]).
    """

    def __init__(self, input_size: int, hidden_size: int, num_gates: int, cell, window=None):
        super().__init__()
        rows = num_gates * hidden_size
        self.weight_ih = nn.Parameter(torch.randn(rows, input_size) * 0.01)
        self.weight_hh = nn.Parameter(torch.randn(rows, hidden_size) * 0.01)
        self.bias_ih = nn.Parameter(torch.zeros(rows))
        self.bias_hh = nn.Parameter(torch.zeros(rows))
        self.cell = cell
        self.window = window
        self.weight_dropout = 0.0  # set by the model: DropConnect on weight_hh
        self.cell_kernel = "auto"  # set by the model: model.cell_kernel for manual windows

    def project_input(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Input projection of the whole window plus `bias` (default b_ih):
        (T, B) ids or (T, B, I) -> (T, B, G*H)."""
        return project_input(x, self.weight_ih, self.bias_ih if bias is None else bias)

    def recurrent_weight(self) -> torch.Tensor:
        """W_hh, with DropConnect in training: one mask per call, shared by every step; the
        gradient flows through the mask back to W_hh (also through the manual windows)."""
        return drop(self.weight_hh, self.weight_dropout, self.training)

    def forward(self, x: torch.Tensor, state: State,
                xi: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        if self.window is not None:
            weights = LayerWeights(self.weight_ih, self.recurrent_weight(), self.bias_ih,
                                   self.bias_hh)
            return self.window(weights, x, state, xi, self.cell_kernel)
        xw = self.project_input(x)
        w_hh = self.recurrent_weight()
        outputs = []
        for t in range(xw.shape[0]):
            if xi is not None:  # randomized truncation: scale the whole carried state's path
                state = tuple(scale_grad(s, xi[t]) for s in state)
            state = self.cell(xw[t], state, w_hh, self.bias_hh)
            outputs.append(state[0])
        return torch.stack(outputs), state  # (T, B, H)


class ScratchLM(LanguageModel):
    cell = staticmethod(rnn_cell)
    manual_window = staticmethod(rnn_window)
    num_gates = 1
    supports = Supports(step_by_step=True, manual_backward=True, c_windows=True, c_steps=True)

    def __init__(self, vocab_size, hidden_size, num_layers=1, dropout=0.0, embedding_dim=None,
                 backward: str = "manual", cell_kernel: str = "auto", **options):
        super().__init__(vocab_size, hidden_size, num_layers, dropout, embedding_dim, **options)
        cell, window = self.cell_and_window(backward)
        self.layers = nn.ModuleList(
            ScratchLayer(self.input_size if k == 0 else hidden_size, hidden_size,
                         self.num_gates, cell, window)
            for k in range(num_layers))
        self.between = self.make_dropout(dropout)
        for layer in self.layers:
            layer.weight_dropout = self.weight_dropout
            layer.cell_kernel = cell_kernel
        nn.init.normal_(self.output.weight, std=0.01)
        nn.init.zeros_(self.output.bias)

    def cell_and_window(self, backward: str):
        """The per-step cell and, with model.backward=manual, the hand-written window."""
        return self.cell, (self.manual_window if backward == "manual" else None)

    def core(self, x, state: State, xi=None):
        finals = []
        for k, layer in enumerate(self.layers):
            if k > 0:
                x = self.between(x)
            x, final = layer(x, tuple(s[k] for s in state), xi)
            finals.append(final)
        return x, tuple(torch.stack(parts) for parts in zip(*finals))

    def recurrent_weight(self, layer: int):
        return self.layers[layer].weight_hh

    def decoder(self) -> Decoder:
        """Each layer's own cell (the one training steps through: the RNN's activation, the
        gates) on weights prepared once, a table row per token and no autograd."""
        return PreparedDecoder(self, self.layers)


class ScratchRNN(ScratchLM):
    cell = staticmethod(rnn_cell)
    manual_window = staticmethod(rnn_window)
    num_gates = 1
    activations = ("tanh", "identity")
    # the RNN's elementwise step is one tanh: only its whole-window loop is worth a C call
    supports = Supports(step_by_step=True, manual_backward=True, c_windows=True)

    def cell_and_window(self, backward: str):
        cell = rnn_cell if self.activation == "tanh" else linear_rnn_cell
        window = partial(rnn_window, activation=self.activation)
        return cell, (window if backward == "manual" else None)


class ScratchGRU(ScratchLM):
    cell = staticmethod(gru_cell)
    manual_window = staticmethod(gru_manual_window)
    num_gates = 3
    gate_names = ("r", "z", "n")


class ScratchLSTM(ScratchLM):
    cell = staticmethod(lstm_cell)
    manual_window = staticmethod(lstm_manual_window)
    num_gates = 4
    state_size = 2
    gate_names = ("i", "f", "g", "o")
