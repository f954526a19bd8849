"""The config checks follow what each model class declares (Supports, activations, twin), not
its name: a new kind registered with other declarations is checked by them."""

import dataclasses

import pytest
import torch

from rnnlm.config import ConfigError, checks, load_config
from rnnlm.models import MODEL_KINDS, Supports
from rnnlm.models.scratch import ScratchLSTM, ScratchRNN
from rnnlm.models.torch_nn import TorchLSTM
from rnnlm.training.step import resolve_batch_shards


class FusedToy(ScratchRNN):
    """A kind that declares nothing beyond the defaults (as a fused torch.nn layer does)."""

    supports = Supports()
    activations = ("tanh", "identity")


class SteppedToy(TorchLSTM):
    """A torch.nn-based kind that claims step-by-step windows and no twin."""

    supports = Supports(step_by_step=True)
    twin = None


@pytest.fixture
def toys(monkeypatch):
    monkeypatch.setitem(MODEL_KINDS, "fused_toy", FusedToy)
    monkeypatch.setitem(MODEL_KINDS, "stepped_toy", SteppedToy)


def test_every_registered_kind_declares_what_it_supports():
    for kind, cls in MODEL_KINDS.items():
        assert isinstance(cls.supports, Supports), kind
        assert cls.twin is None or cls.twin in MODEL_KINDS, kind
        if cls.twin is not None:  # a twin offers what the fused layer lacks
            assert MODEL_KINDS[cls.twin].supports.randomized_truncation


def test_randomized_truncation_follows_the_declaration(toys):
    load_config(None, ["model.kind=stepped_toy", "train.truncation=randomized"])
    with pytest.raises(ConfigError, match="use one of rnn_scratch, gru_scratch, lstm_scratch, "
                                          "stepped_toy or another"):
        load_config(None, ["model.kind=fused_toy", "train.truncation=randomized"])


def test_manual_backward_and_c_windows_follow_the_declaration(toys, monkeypatch):
    with pytest.raises(ConfigError, match=r"model.backward: manual is offered for rnn_scratch, "
                                          r"gru_scratch, lstm_scratch, lru, mingru, minlstm "
                                          r"only .* fused_toy declares none"):
        load_config(None, ["model.kind=fused_toy", "model.backward=manual"])
    with pytest.raises(ConfigError, match=r"model.cell_kernel: c is offered for rnn_scratch, "
                                          r"gru_scratch, lstm_scratch, rnn, gru, lstm only"):
        load_config(None, ["model.kind=fused_toy", "model.cell_kernel=c"])
    load_config(None, ["model.kind=rnn_scratch", "model.backward=manual"])
    monkeypatch.setattr(FusedToy, "supports", Supports(c_windows=True))
    load_config(None, ["model.kind=fused_toy", "model.cell_kernel=c"])


def test_activations_are_asked_of_the_classes(toys):
    load_config(None, ["model.kind=fused_toy", "model.activation=identity"])
    with pytest.raises(ConfigError, match="only offered for rnn_scratch, fused_toy"):
        load_config(None, ["model.kind=lstm", "model.activation=identity"])


def test_auto_shards_follow_the_declaration(toys, monkeypatch):
    monkeypatch.setattr("rnnlm.training.step.usable_cores", lambda: 2)
    cpu = torch.device("cpu")
    for kind, expected in (("rnn", 2), ("fused_toy", 2)):
        cfg = load_config(None, [f"model.kind={kind}", "train.batch_shards=auto"])
        assert resolve_batch_shards(cfg, cpu, distributed=False) == expected, kind
    monkeypatch.setattr(FusedToy, "supports", Supports(auto_shards=False))
    cfg = load_config(None, ["model.kind=fused_toy", "train.batch_shards=auto"])
    assert resolve_batch_shards(cfg, cpu, distributed=False) == 1
    # auto_shards_on_c_windows: shards where the C kernels will run, not on the fused layer
    monkeypatch.setattr(FusedToy, "supports", Supports(auto_shards=False, c_windows=True,
                                                       auto_shards_on_c_windows=True))
    monkeypatch.setattr(checks.native, "unavailable_reason", lambda whole_windows=False: None)
    for kernel, expected in (("auto", 2), ("c", 2), ("torch", 1)):
        cfg = load_config(None, ["model.kind=fused_toy", "train.batch_shards=auto",
                                 f"model.cell_kernel={kernel}"])
        assert resolve_batch_shards(cfg, cpu, distributed=False) == expected, kernel
    assert resolve_batch_shards(cfg, torch.device("cuda"), distributed=False) == 1
    monkeypatch.setattr(checks.native, "unavailable_reason", lambda whole_windows=False: "no")
    cfg = load_config(None, ["model.kind=fused_toy", "train.batch_shards=auto"])
    assert resolve_batch_shards(cfg, cpu, distributed=False) == 1


def test_c_step_kernels_decide_what_the_c_kernels_need(monkeypatch):
    asked = []
    monkeypatch.setattr(checks.native, "unavailable_reason",
                        lambda whole_windows=False: asked.append(whole_windows))
    for kind in ("rnn_scratch", "lstm_scratch"):
        checks.check_cell_kernel(load_config(None, [f"model.kind={kind}"]), torch.device("cpu"))
    assert asked == [True, False]  # the RNN has only whole-window C loops
    assert not ScratchRNN.supports.c_steps and ScratchLSTM.supports.c_steps


def test_bf16_and_compile_are_asked_of_the_classes(toys, monkeypatch):
    monkeypatch.setattr(FusedToy, "supports", dataclasses.replace(Supports(), bf16=False,
                                                                  compile=False))
    with pytest.raises(ConfigError, match="train.precision: bf16 is not offered for fused_toy"):
        load_config(None, ["model.kind=fused_toy", "train.precision=bf16"])
    with pytest.raises(ConfigError, match="train.compile is not offered for fused_toy"):
        load_config(None, ["model.kind=fused_toy", "train.compile=true"])
    load_config(None, ["model.kind=lstm", "train.precision=bf16"])
