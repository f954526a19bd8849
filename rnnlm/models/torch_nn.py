"""PyTorch's own recurrent layers (cuDNN on GPU) behind the common contract."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from rnnlm.models.base import LanguageModel, State


class TorchRecurrentLM(LanguageModel):
    layer_class: type[nn.RNNBase] = nn.RNN

    def __init__(self, vocab_size, hidden_size, num_layers=1, dropout=0.0, embedding_dim=None,
                 **options):
        super().__init__(vocab_size, hidden_size, num_layers, dropout, embedding_dim, **options)
        self.rnn = self.layer_class(self.input_size, hidden_size, num_layers=num_layers,
                                    dropout=dropout if num_layers > 1 else 0.0)

    def core(self, x, state: State, xi=None):
        if xi is not None:
            raise ValueError("randomized truncation needs a step-by-step model: torch.nn layers "
                             "run the whole window in one fused call")
        if self.embedding is None:
            x = self.one_hot(x)
        state_in = state if self.state_size == 2 else state[0]
        if self.training and self.weight_dropout > 0:
            # DropConnect: the layer runs once with dropped copies of its recurrent weights
            # (gradients flow back to the originals), one mask for the whole window.
            dropped = {f"weight_hh_l{k}": F.dropout(getattr(self.rnn, f"weight_hh_l{k}"),
                                                    self.weight_dropout)
                       for k in range(self.num_layers)}
            outputs, new = functional_call(self.rnn, dropped, (x, state_in))
        else:
            outputs, new = self.rnn(x, state_in)
        return outputs, (new if self.state_size == 2 else (new,))

    def recurrent_weight(self, layer: int):
        return getattr(self.rnn, f"weight_hh_l{layer}")


class TorchRNN(TorchRecurrentLM):
    layer_class = nn.RNN


class TorchGRU(TorchRecurrentLM):
    layer_class = nn.GRU
    gate_names = ("r", "z", "n")


class TorchLSTM(TorchRecurrentLM):
    layer_class = nn.LSTM
    gate_names = ("i", "f", "g", "o")
    state_size = 2
