"""Model registry: `model.kind` -> class. Every class keeps the contract of `base.py`."""

from __future__ import annotations

from rnnlm.models.base import LanguageModel, State, Supports, detach_state
from rnnlm.models.scratch import ScratchGRU, ScratchLSTM, ScratchRNN
from rnnlm.models.torch_nn import TorchGRU, TorchLSTM, TorchRNN

MODEL_KINDS: dict[str, type[LanguageModel]] = {
    "rnn_scratch": ScratchRNN,
    "gru_scratch": ScratchGRU,
    "lstm_scratch": ScratchLSTM,
    "rnn": TorchRNN,
    "gru": TorchGRU,
    "lstm": TorchLSTM,
}


def build_model(model_cfg, vocab_size: int, train_cfg=None) -> LanguageModel:
    """The model a config describes. train_cfg (optional) decides what model.backward=auto
    means for the kinds with a hand-written backward: that backward, except under bf16
    autocast or torch.compile, which need autograd's graph."""
    cls = MODEL_KINDS[model_cfg.kind]
    extra = {}
    if cls.supports.manual_backward:
        needs_autograd = train_cfg is not None and \
            (train_cfg.precision != "fp32" or train_cfg.compile)
        auto = "autograd" if needs_autograd else "manual"
        extra["backward"] = auto if model_cfg.backward == "auto" else model_cfg.backward
        extra["cell_kernel"] = model_cfg.cell_kernel
    return cls(vocab_size, model_cfg.hidden_size, num_layers=model_cfg.num_layers,
               dropout=model_cfg.dropout, embedding_dim=model_cfg.embedding_dim,
               activation=model_cfg.activation,
               input_dropout=model_cfg.input_dropout, output_dropout=model_cfg.output_dropout,
               weight_dropout=model_cfg.weight_dropout,
               dropout_masks=model_cfg.dropout_masks, **extra)


__all__ = ["MODEL_KINDS", "LanguageModel", "State", "Supports", "build_model", "detach_state"]
