"""PyTorch's own recurrent layers (cuDNN on GPU) behind the common contract, and, on a CPU,
the same layers run through the project's C window loops.

The models hold an nn.RNN / nn.GRU / nn.LSTM, so their parameters and state_dict are always
the layer's own (`rnn.weight_ih_l0`, ...). Where `model.cell_kernel` lets it and the forward
pass can use them (a CPU, float32 or bf16 autocast with bf16 products for the kinds that
declare supports.c_windows_bf16, eager, and the C window loops built here:
`uses_c_windows`), `core` runs the layers one at a time through the hand-written windows of
the scratch layers (rnnlm.models.scratch, rnnlm.bptt: forward and BPTT backward in C, calling
PyTorch's MKL) on those same parameters; elsewhere it calls the layer itself. Both compute the
same function (tests/models/test_torch_nn_windows.py), so a checkpoint does not depend on
which one trained it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from rnnlm.kernels import native
from rnnlm.models.base import LanguageModel, State, Supports, drop
from rnnlm.models.scratch import LayerWeights, gru_manual_window, lstm_manual_window, rnn_window

#: nn.RNNBase.mode -> the op its forward calls (torch.rnn_tanh(input, hx, weights, ...))
LAYER_OPS = {"RNN_TANH": torch.rnn_tanh, "RNN_RELU": torch.rnn_relu, "GRU": torch.gru,
             "LSTM": torch.lstm}


class TorchRecurrentLM(LanguageModel):
    layer_class: type[nn.RNNBase] = nn.RNN
    #: the scratch layers' hand-written window for this layer's equations (scratch.py)
    manual_window = staticmethod(rnn_window)
    # Whole-window C loops only (no c_steps): without torch's MKL the step loop would stay
    # in Python with a C call per step, where the layer is one fused call, so the layer runs.
    supports = Supports(c_windows=True)
    #: windows of fewer steps run the layer: generation feeds one token per call, where there
    #: is no loop over steps for C to take over, and preparing W_hh for the C products costs
    #: more than the step itself (one lane, no grad: 0.2-0.7x the layer's speed)
    c_windows_from_steps = 2

    def __init__(self, vocab_size, hidden_size, num_layers=1, dropout=0.0, embedding_dim=None,
                 cell_kernel: str = "auto", **options):
        super().__init__(vocab_size, hidden_size, num_layers, dropout, embedding_dim, **options)
        # model.cell_kernel: "torch" always calls the layer; "auto" and "c" run the C windows
        # wherever uses_c_windows() holds (that "c" can hold for a training run is checked
        # before it starts, rnnlm.config.checks.check_cell_kernel).
        self.cell_kernel = cell_kernel
        # torch.nn draws a fresh dropout mask for every step between its stacked layers; with
        # locked masks the layers run one at a time and this model drops between them.
        self.layer_by_layer = self.dropout_masks == "locked" and num_layers > 1 and dropout > 0
        inner_dropout = dropout if num_layers > 1 and not self.layer_by_layer else 0.0
        self.rnn = self.layer_class(self.input_size, hidden_size, num_layers=num_layers,
                                    dropout=inner_dropout)
        # Between stacked layers where this model runs them one at a time: locked masks, the
        # C windows, and per-step masks in CPU training, where the layer's inner dropout
        # draws its masks about three times slower than `between` (base.keep_mask); each
        # layer's op is what the stacked layer calls per layer anyway on a CPU. On a GPU the
        # stacked call keeps cuDNN's own dropout and flat weights.
        self.between = self.make_dropout(dropout if num_layers > 1 else 0.0)

    def uses_c_windows(self, steps: int | None = None) -> bool:
        """Whether a forward pass (over a window of `steps`, when given) runs the C windows
        instead of the layer.

        Asked at every call rather than fixed when the model is built, because one model
        meets several contexts in one run: its training step may run under bf16 autocast
        (torch.is_autocast_enabled: the C loops then need bf16 products, native.bf16_products,
        and a kind that declares them faster than its layer, supports.c_windows_bf16) or be
        traced by torch.compile (the ctypes calls are
        opaque to it), while evaluation and sampling run the same module eagerly in float32,
        where the C windows apply; a checkpoint may also land on a GPU or be cast to float64.
        """
        if torch.compiler.is_compiling():
            return False
        if steps is not None and steps < self.c_windows_from_steps:
            return False
        weight = self.rnn.weight_hh_l0
        if torch.is_autocast_enabled(weight.device.type) and not (
                self.supports.c_windows_bf16 and native.bf16_products(weight)):
            return False
        # cell_kernel "torch", a GPU, float64, or no whole-window C loops here: the layer
        return native.usable_for(self.cell_kernel, weight, None, whole_windows=True)

    def core(self, x, state: State, xi=None):
        if xi is not None:
            raise ValueError("randomized truncation needs a step-by-step model: torch.nn layers "
                             "run the whole window in one fused call")
        dropped = {}
        if self.training and self.weight_dropout > 0:
            # DropConnect: the layer runs with dropped copies of its recurrent weights
            # (gradients flow back to the originals), one mask for the whole window.
            dropped = {f"weight_hh_l{k}": drop(getattr(self.rnn, f"weight_hh_l{k}"),
                                               self.weight_dropout)
                       for k in range(self.num_layers)}
        if self.uses_c_windows(x.shape[0]):
            # ids stay ids: the windows gather weight columns instead of a one-hot matmul
            return self.run_windows(x, state, dropped)
        if self.embedding is None:
            x = self.one_hot(x)
        if self.layer_by_layer or (self.training and self.rnn.dropout > 0
                                   and x.device.type == "cpu"):
            return self.run_layers(x, state, dropped)
        state_in = state if self.state_size == 2 else state[0]
        if dropped:
            outputs, new = functional_call(self.rnn, dropped, (x, state_in))
        else:
            outputs, new = self.rnn(x, state_in)
        return outputs, (new if self.state_size == 2 else (new,))

    def layer_weights(self, k: int, replaced: dict) -> LayerWeights:
        """Layer k's parameters (those in `replaced` overriding the layer's own)."""
        return LayerWeights(*(replaced.get(name, getattr(self.rnn, name))
                              for name in (f"weight_ih_l{k}", f"weight_hh_l{k}",
                                           f"bias_ih_l{k}", f"bias_hh_l{k}")))

    def run_windows(self, x, state: State, replaced: dict):
        """The stacked layers one at a time through the C windows (the scratch layers' own
        window functions, on this layer's parameters), `between` dropout on each lower
        layer's output. Input ids (T, B) for one-hot models, or embeddings (T, B, E)."""
        finals = []
        for k in range(self.num_layers):
            if k > 0:
                x = self.between(x)
            x, final = self.manual_window(self.layer_weights(k, replaced), x,
                                          tuple(s[k] for s in state), None, self.cell_kernel)
            finals.append(final)
        return x, tuple(torch.stack(parts) for parts in zip(*finals))

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
            weights = list(self.layer_weights(k, replaced))
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
    manual_window = staticmethod(gru_manual_window)
    twin = "gru_scratch"
    gate_names = ("r", "z", "n")


class TorchLSTM(TorchRecurrentLM):
    layer_class = nn.LSTM
    manual_window = staticmethod(lstm_manual_window)
    twin = "lstm_scratch"
    # oneDNN's fused LSTM already keeps both cores busy: two lane groups measured 0.81x on
    # the 2-core machine, where the other kinds gained 1.01-1.22x (docs/benchmarks.md). On
    # the C windows (one thread each, the scratch LSTM's loops) two lane groups pay again.
    supports = Supports(c_windows=True, auto_shards=False, auto_shards_on_c_windows=True,
                        c_windows_bf16=False)
    gate_names = ("i", "f", "g", "o")
    state_size = 2
