"""Model registry: `model.kind` -> class. Every class keeps the contract of `base.py`."""

from __future__ import annotations

from rnnlm.models.base import LanguageModel, State, detach_state
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


def build_model(model_cfg, vocab_size: int) -> LanguageModel:
    cls = MODEL_KINDS[model_cfg.kind]
    extra = {}
    if cls.step_by_step:
        extra["backward"] = "manual" if model_cfg.backward == "auto" else model_cfg.backward
    return cls(vocab_size, model_cfg.hidden_size, num_layers=model_cfg.num_layers,
               dropout=model_cfg.dropout, embedding_dim=model_cfg.embedding_dim,
               activation=model_cfg.activation,
               input_dropout=model_cfg.input_dropout, output_dropout=model_cfg.output_dropout,
               weight_dropout=model_cfg.weight_dropout, **extra)


__all__ = ["MODEL_KINDS", "LanguageModel", "State", "build_model", "detach_state"]
