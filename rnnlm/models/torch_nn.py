"""PyTorch's own recurrent layers (cuDNN on GPU) behind the common contract."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from rnnlm.models.base import LanguageModel, State, Supports

#: nn.RNNBase.mode -> the op its forward calls (torch.rnn_tanh(input, hx, weights, ...))
LAYER_OPS = {"RNN_TANH": torch.rnn_tanh, "RNN_RELU": torch.rnn_relu, "GRU": torch.gru,
             "LSTM": torch.lstm}


class TorchRecurrentLM(LanguageModel):
    layer_class: type[nn.RNNBase] = nn.RNN

    def __init__(self, vocab_size, hidden_size, num_layers=1, dropout=0.0, embedding_dim=None,
                 **options):
        super().__init__(vocab_size, hidden_size, num_layers, dropout, embedding_dim, **options)
        # torch.nn draws a fresh dropout mask for every step between its stacked layers; with
        # locked masks the layers run one at a time and this model drops between them.
        self.layer_by_layer = self.dropout_masks == "locked" and num_layers > 1 and dropout > 0
        inner_dropout = dropout if num_layers > 1 and not self.layer_by_layer else 0.0
        self.rnn = self.layer_class(self.input_size, hidden_size, num_layers=num_layers,
                                    dropout=inner_dropout)
        self.between = self.make_dropout(dropout if self.layer_by_layer else 0.0)

    def core(self, x, state: State, xi=None):
        if xi is not None:
            raise ValueError("randomized truncation needs a step-by-step model: torch.nn layers "
                             "run the whole window in one fused call")
        if self.embedding is None:
            x = self.one_hot(x)
        dropped = {}
        if self.training and self.weight_dropout > 0:
            # DropConnect: the layer runs with dropped copies of its recurrent weights
            # (gradients flow back to the originals), one mask for the whole window.
            dropped = {f"weight_hh_l{k}": F.dropout(getattr(self.rnn, f"weight_hh_l{k}"),
                                                    self.weight_dropout)
                       for k in range(self.num_layers)}
        if self.layer_by_layer:
            return self.run_layers(x, state, dropped)
        state_in = state if self.state_size == 2 else state[0]
        if dropped:
            outputs, new = functional_call(self.rnn, dropped, (x, state_in))
        else:
            outputs, new = self.rnn(x, state_in)
        return outputs, (new if self.state_size == 2 else (new,))

    def run_layers(self, x, state: State, replaced: dict):
        """The stacked layers one at a time, with `between` dropout on each lower layer's
        output; `replaced` overrides some of the layer's weights (DropConnect). Each layer is
        the op the torch.nn layer itself calls, for one layer; on a GPU the layers above the
        first then give up cuDNN's flat weight buffer (their weights are copied per call)."""
        layer_op = LAYER_OPS[self.rnn.mode]
        finals = []
        for k in range(self.num_layers):
            if k > 0:
                x = self.between(x)
            weights = [replaced.get(name, getattr(self.rnn, name))
                       for name in (f"weight_ih_l{k}", f"weight_hh_l{k}",
                                    f"bias_ih_l{k}", f"bias_hh_l{k}")]
            hx = [s[k:k + 1] for s in state]
            x, *final = layer_op(x, hx if self.state_size == 2 else hx[0], weights,
                                 True, 1, 0.0, self.training, False, False)
            # (has_biases, num_layers, dropout, train, bidirectional, batch_first)
            finals.append(final)
        return x, tuple(torch.cat(parts) for parts in zip(*finals))

    def recurrent_weight(self, layer: int):
        return getattr(self.rnn, f"weight_hh_l{layer}")


class TorchRNN(TorchRecurrentLM):
    layer_class = nn.RNN
    twin = "rnn_scratch"


class TorchGRU(TorchRecurrentLM):
    layer_class = nn.GRU
    twin = "gru_scratch"
    gate_names = ("r", "z", "n")


class TorchLSTM(TorchRecurrentLM):
    layer_class = nn.LSTM
    twin = "lstm_scratch"
    # oneDNN's fused LSTM already keeps both cores busy: two lane groups measured 0.81x on
    # the 2-core machine, where the other kinds gained 1.01-1.22x (docs/benchmarks.md)
    supports = Supports(auto_shards=False)
    gate_names = ("i", "f", "g", "o")
    state_size = 2
