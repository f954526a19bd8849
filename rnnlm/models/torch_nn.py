"""PyTorch's own recurrent layers (cuDNN on GPU) behind the common contract."""

from __future__ import annotations

from torch import nn

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
        outputs, new = self.rnn(x, state if self.state_size == 2 else state[0])
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
