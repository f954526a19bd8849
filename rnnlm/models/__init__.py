"""The models (D2L 8.5, 8.6, 9.1, 9.2): the contract every model keeps and what each kind
declares it supports (base.py), the from-scratch cells (scratch.py), PyTorch's layers behind
the same contract (torch_nn.py), the scratch models' one-step decoder (decoding.py), the
recurrences linear in h trained by parallel scan, LRU, minGRU and minLSTM (linear_recurrent.py),
and here the registry: `model.kind` -> class.

May import: rnnlm.bptt (the hand-written window backward the scratch layers run, and through
it rnnlm.kernels; the scans of the linear recurrences). Nothing above: the config checks, the
run and the commands ask the models, never the other way round.
"""

from __future__ import annotations

from rnnlm.models.base import LanguageModel, State, Supports, detach_state
from rnnlm.models.linear_recurrent import LRU, MinGRU, MinLSTM
from rnnlm.models.scratch import ScratchGRU, ScratchLSTM, ScratchRNN
from rnnlm.models.torch_nn import TorchGRU, TorchLSTM, TorchRNN

MODEL_KINDS: dict[str, type[LanguageModel]] = {
    "rnn_scratch": ScratchRNN,
    "gru_scratch": ScratchGRU,
    "lstm_scratch": ScratchLSTM,
    "rnn": TorchRNN,
    "gru": TorchGRU,
    "lstm": TorchLSTM,
    "lru": LRU,
    "mingru": MinGRU,
    "minlstm": MinLSTM,
}


def build_model(model_cfg, vocab_size: int, train_cfg=None,
                device_type: str = "cpu") -> LanguageModel:
    """The model a config describes. train_cfg (optional) decides what model.backward=auto
    means for the kinds with a hand-written backward: that backward, except under
    torch.compile, which needs autograd's graph, and under bf16 autocast off the CPU (on a
    CPU the hand-written windows run in float32 with bf16 recurrent products where the C
    windows run, native.bf16_products). model.cell_kernel goes as given
    to the kinds with C windows: each decides per window whether the C loops can run there
    (a torch.nn kind also falls back to its layer under autocast or torch.compile)."""
    cls = MODEL_KINDS[model_cfg.kind]
    extra = {}
    if cls.supports.manual_backward:
        needs_autograd = train_cfg is not None and (train_cfg.compile or (
            train_cfg.precision == "bf16" and device_type != "cpu"))
        auto = "autograd" if needs_autograd else "manual"
        extra["backward"] = auto if model_cfg.backward == "auto" else model_cfg.backward
    if cls.supports.c_windows:
        extra["cell_kernel"] = model_cfg.cell_kernel
    return cls(vocab_size, model_cfg.hidden_size, num_layers=model_cfg.num_layers,
               dropout=model_cfg.dropout, embedding_dim=model_cfg.embedding_dim,
               activation=model_cfg.activation,
               input_dropout=model_cfg.input_dropout, output_dropout=model_cfg.output_dropout,
               weight_dropout=model_cfg.weight_dropout,
               dropout_masks=model_cfg.dropout_masks, **extra)


__all__ = ["MODEL_KINDS", "LanguageModel", "State", "Supports", "build_model", "detach_state"]
