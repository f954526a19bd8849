"""train.precision (bf16 autocast) and train.compile (torch.compile of the training model)."""

import pytest
import torch

from rnnlm.config import ConfigError, config_from_dict, load_config
from rnnlm.models import MODEL_KINDS, build_model
from rnnlm.training.run import train
from rnnlm.training.step import ShardedForwardBackward, forward_backward
from tests.conftest import ROOT
from tests.training.test_epoch import read_metrics


def small_model(kind, *overrides):
    cfg = config_from_dict({}, [f"model.kind={kind}", "model.hidden_size=16",
                                "model.num_layers=2", *overrides])
    model = build_model(cfg.model, 9, cfg.train)
    with torch.no_grad():  # away from the near-uniform start, where bf16 rounding hides
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
@pytest.mark.parametrize("shards", [1, 2])
def test_bf16_step_computes_in_bf16_and_keeps_fp32_state_and_grads(kind, shards):
    torch.manual_seed(0)
    model = small_model(kind, "train.precision=bf16")
    seen = []
    model.output.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    X, Y = torch.randint(0, 9, (4, 6)), torch.randint(0, 9, (4, 6))
    state = model.begin_state(4)
    step = ShardedForwardBackward(2, "bf16") if shards == 2 else forward_backward
    loss, fast_state = step(model, X, Y, state, **({} if shards == 2 else {"precision": "bf16"}))
    fast_grads = [p.grad.clone() for p in model.parameters()]
    assert seen and set(seen) == {torch.bfloat16}  # the output layer ran under autocast
    assert loss.dtype == torch.float32
    assert all(s.dtype == torch.float32 for s in fast_state)
    assert all(g.dtype == torch.float32 for g in fast_grads)

    model.zero_grad(set_to_none=True)
    exact, exact_state = forward_backward(model, X, Y, state)
    assert set(seen[-1:]) == {torch.float32}
    # bf16 keeps ~3 significant digits: close to fp32, but not equal
    assert abs(loss.item() - exact.item()) < 0.02 * exact.item()
    assert loss.item() != exact.item()
    for a, b in zip(fast_state, exact_state):
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.05)
    if shards == 2:
        step.close()


def test_bf16_training_run_stays_close_to_fp32(tiny_overrides, tmp_path):
    finals = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(ROOT / "configs/tiny.yaml",
                          [*tiny_overrides[:1], f"out_dir={tmp_path / precision}",
                           "model.kind=gru", "train.optimizer=adam", "train.lr=0.01",
                           "train.epochs=3", f"train.precision={precision}",
                           "train.predict_every=0"])
        train(cfg, quiet=True)
        finals[precision] = read_metrics(tmp_path / precision)[-1]["train_ppl"]
    assert finals["bf16"] != finals["fp32"]
    assert abs(finals["bf16"] - finals["fp32"]) < 0.05 * finals["fp32"]


def test_manual_backward_is_refused_under_bf16_or_compile():
    for option in ("train.precision=bf16", "train.compile=true"):
        with pytest.raises(ConfigError, match="model.backward: manual"):
            config_from_dict({}, ["model.kind=gru_scratch", "model.backward=manual", option])
    # auto picks autograd there, and the hand-written backward otherwise
    assert small_model("gru_scratch", "train.compile=true").layers[0].window is None
    assert small_model("gru_scratch").layers[0].window is not None


def test_compile_with_batch_shards_is_refused():
    with pytest.raises(ConfigError, match="train.compile with train.batch_shards"):
        config_from_dict({}, ["train.compile=true", "train.batch_shards=2"])


def test_compiled_step_matches_eager():
    torch.manual_seed(0)
    # tiny and one layer: compilation time grows with the unrolled window
    model = small_model("rnn_scratch", "train.compile=true", "model.num_layers=1")
    compiled = torch.compile(model)
    X, Y = torch.randint(0, 9, (3, 2)), torch.randint(0, 9, (3, 2))
    state = tuple(torch.randn_like(s) for s in model.begin_state(3))
    results = []
    for step_model in (model, compiled):
        model.zero_grad(set_to_none=True)
        loss, new_state = forward_backward(step_model, X, Y, state)
        results.append([loss.detach(), *new_state, *(p.grad.clone() for p in model.parameters())])
    for eager, fast in zip(*results):
        torch.testing.assert_close(fast, eager, atol=1e-5, rtol=1e-5)


def test_trainer_compiles_the_training_model_only(tiny_overrides, tmp_path, monkeypatch):
    compiled = []

    def spy(model, **kwargs):  # stands in for torch.compile: records what it was given
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", spy)
    cfg = load_config(ROOT / "configs/tiny.yaml",
                      [*tiny_overrides[:1], f"out_dir={tmp_path / 'run'}",
                       "model.kind=gru_scratch", "train.compile=true", "train.epochs=1"])
    train(cfg, quiet=True)
    assert len(compiled) == 1 and compiled[0].layers[0].window is None  # autograd backward
