"""PyTorch's own recurrent layers (cuDNN on GPU) behind the common contract."""

from __future__ import annotations

from torch import nn

from rnnlm.models.base import LanguageModel, State


class TorchRecurrentLM(LanguageModel):
    layer_class: type[nn.RNNBase] = nn.RNN

    def __init__(self, vocab_size, hidden_size, num_layers=1, dropout=0.0, embedding_dim=None):
        super().__init__(vocab_size, hidden_size, num_layers, dropout, embedding_dim)
        self.rnn = self.layer_class(self.input_size, hidden_size, num_layers=num_layers,
                                    dropout=dropout if num_layers > 1 else 0.0)

    def core(self, x, state: State):
        if self.embedding is None:
            x = self.one_hot(x)
        outputs, new = self.rnn(x, state if self.state_size == 2 else state[0])
        return outputs, (new if self.state_size == 2 else (new,))


class TorchRNN(TorchRecurrentLM):
    layer_class = nn.RNN


class TorchGRU(TorchRecurrentLM):
    layer_class = nn.GRU


class TorchLSTM(TorchRecurrentLM):
    layer_class = nn.LSTM
    state_size = 2
