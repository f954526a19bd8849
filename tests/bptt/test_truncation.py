"""Truncation strategies end to end: config refusals, xi draws, lr scaling, every combination
of model x strategy x iterator, and manual vs autograd BPTT agreeing in real training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rnnlm.bptt.truncation import Truncation, variable_length_of
from rnnlm.config import ConfigError, config_from_dict, load_config
from rnnlm.data.iterators import BatchIterator
from rnnlm.models import MODEL_KINDS, build_model
from rnnlm.training.epoch import train_epoch
from rnnlm.training.run import train
from rnnlm.training.step import ShardedForwardBackward, forward_backward
from tests.conftest import ROOT

STRATEGIES = ["regular", "randomized", "variable_length"]


@pytest.mark.parametrize("overrides, fragment", [
    (["model.kind=lstm", "train.truncation=randomized"], "needs a step-by-step model"),
    (["model.kind=rnn", "train.truncation=randomized"], "use model.kind=rnn_scratch"),
    (["data.iterator=random", "train.truncation=variable_length"],
     "use data.iterator=sequential"),
    (["train.truncation_pi=0"], "train.truncation_pi must be in (0, 1]"),
    (["train.truncation_pi=1.5"], "train.truncation_pi must be in (0, 1]"),
    (["train.variable_length_p=2"], "train.variable_length_p must be in [0, 1]"),
    (["train.variable_length_std=-1"], "train.variable_length_std must be >= 0"),
    (["train.variable_length_min=36"], "train.variable_length_min must be in [1, data.num_"),
    (["train.truncation=full"], "train.truncation must be one of regular, randomized, "),
    (["model.kind=gru_scratch", "model.activation=identity"], "only offered for rnn_scratch"),
    (["model.kind=lstm", "model.activation=identity"], "set model.activation=tanh"),
    (["train.diagnostics_every=0"], "train.diagnostics_every must be >= 1"),
])
def test_refused_at_config_load(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        config_from_dict({}, overrides)
    assert fragment in str(info.value)


def _tiny_batches(cfg, n=2):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 7, size=400)
    it = BatchIterator(ids, cfg.data.batch_size, cfg.data.num_steps, cfg.data.iterator,
                       seed=0, variable_length=variable_length_of(cfg.train))
    return [b for _, b in zip(range(n), it.epoch(0))], it.carries_state


@pytest.mark.parametrize("iterator", ["sequential", "random"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_every_combination_trains_or_is_refused(kind, strategy, iterator):
    overrides = [f"model.kind={kind}", f"train.truncation={strategy}",
                 f"data.iterator={iterator}", "model.hidden_size=4", "data.batch_size=2",
                 "data.num_steps=8", "train.variable_length_min=2"]
    refused = (strategy == "randomized" and not kind.endswith("_scratch")) or (
        strategy == "variable_length" and iterator == "random")
    if refused:
        with pytest.raises(ConfigError):
            config_from_dict({}, overrides)
        return
    cfg = config_from_dict({}, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, 7)
    batches, carry = _tiny_batches(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    result = train_epoch(model, batches, opt, 1.0, carry, torch.device("cpu"),
                         truncation=Truncation.from_config(cfg), epoch=0)
    assert result.batches == 2 and np.isfinite(result.loss)


def test_xi_is_seeded_per_epoch_and_batch():
    tr = Truncation("randomized", 35, seed=3, pi=0.5)
    a = tr.xi(2, 5, 35)
    assert torch.equal(a, Truncation("randomized", 35, seed=3, pi=0.5).xi(2, 5, 35))
    assert not torch.equal(a, tr.xi(2, 6, 35)) and not torch.equal(a, tr.xi(3, 5, 35))
    assert not torch.equal(a, Truncation("randomized", 35, seed=4, pi=0.5).xi(2, 5, 35))
    assert set(a.unique().tolist()) == {0.0, 2.0}
    assert Truncation("regular", 35, 3).xi(0, 0, 35) is None
    assert Truncation("variable_length", 35, 3).xi(0, 0, 35) is None


class XiSpy(torch.nn.Module):
    """Records the xi the trainer passes, around a real scratch model."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.output, self.seen = inner, inner.output, []

    def begin_state(self, b):
        return self.inner.begin_state(b)

    def forward(self, X, state, xi=None):
        self.seen.append(None if xi is None else xi.clone())
        return self.inner(X, state, xi=xi)


def test_trainer_passes_the_seeded_xi_and_it_changes_the_gradient():
    cfg = config_from_dict({}, ["train.truncation=randomized", "train.truncation_pi=0.3",
                                "model.hidden_size=6", "data.batch_size=2", "data.num_steps=8"])
    batches, _ = _tiny_batches(cfg, n=3)
    tr = Truncation.from_config(cfg)
    torch.manual_seed(0)
    spy = XiSpy(build_model(cfg.model, 7))
    train_epoch(spy, batches, torch.optim.SGD(spy.parameters(), lr=0.1), None, True,
                torch.device("cpu"), truncation=tr, epoch=4)
    assert len(spy.seen) == 3
    for b, xi in enumerate(spy.seen):
        assert torch.equal(xi, tr.xi(4, b, 8))
    # the xi reaches the backward pass: with a cut, W_hh's gradient differs from regular BPTT
    X, Y = batches[0]
    xi = torch.tensor([1.0, 1.0, 0.0, 2.0, 2.0, 0.0, 1.0, 1.0])
    grads = []
    for use in (None, xi):
        model = spy.inner
        model.zero_grad()
        logits, _ = model(X, model.begin_state(2), xi=use)
        torch.nn.functional.cross_entropy(logits.reshape(-1, 7), Y.t().reshape(-1)).backward()
        grads.append(model.layers[0].weight_hh.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("strategy", ["randomized", "variable_length"])
def test_strategies_with_batch_shards_match_one_thread(strategy):
    """Lane shards on CPU threads (training/step.py) see the same xi and window lengths: the epoch
    equals the single-threaded one up to rounding."""
    cfg = config_from_dict({}, [f"train.truncation={strategy}", "model.hidden_size=6",
                                "data.batch_size=4", "data.num_steps=8",
                                "train.variable_length_min=2"])
    batches, carry = _tiny_batches(cfg, n=4)
    results = []
    for step in (forward_backward, ShardedForwardBackward(2)):
        torch.manual_seed(0)
        model = build_model(cfg.model, 7)
        with torch.no_grad():  # weights large enough for the recurrence (and xi) to matter
            for p in model.parameters():
                p.normal_(0, 0.5)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        results.append(train_epoch(model, batches, opt, 1.0, carry, torch.device("cpu"), step,
                                   truncation=Truncation.from_config(cfg), epoch=1))
        if step is not forward_backward:
            step.close()
    assert results[0].loss == pytest.approx(results[1].loss, rel=1e-6)
    assert results[0].grad_norm == pytest.approx(results[1].grad_norm, rel=1e-6)


@pytest.mark.parametrize("kind", ["rnn_scratch", "gru_scratch", "lstm_scratch"])
@pytest.mark.parametrize("layers", [1, 2])
def test_randomized_truncation_same_in_manual_and_autograd(kind, layers):
    """scale_grad on the carried state (autograd cells) and xi inside the hand-written
    windows are the same estimator: every parameter gradient agrees in float64."""
    xi = torch.tensor([0.0, 2.0, 2.0, 0.0, 2.0, 0.5], dtype=torch.float64)
    X = torch.randint(0, 7, (3, 6), generator=torch.Generator().manual_seed(1))
    grads = {}
    for backward in ("manual", "autograd"):
        cfg = config_from_dict({}, [f"model.kind={kind}", f"model.backward={backward}",
                                    "model.hidden_size=5", f"model.num_layers={layers}"])
        torch.manual_seed(0)
        model = build_model(cfg.model, 7).double()
        with torch.no_grad():  # weights large enough for the recurrence to matter
            for p in model.parameters():
                p.normal_(0, 0.4)
        state = tuple(s.normal_().requires_grad_() for s in model.begin_state(3))
        logits, final = model(X, state, xi=xi)
        loss = logits.square().mean() + sum(s.sum() for s in final)
        params = list(model.parameters()) + list(state)
        grads[backward] = torch.autograd.grad(loss, params)
    for a, b in zip(grads["manual"], grads["autograd"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_variable_length_scales_the_learning_rate_then_restores_it():
    tr = Truncation("variable_length", num_steps=10, seed=0)
    p = torch.nn.Parameter(torch.zeros(3))
    for opt_cls in (torch.optim.SGD, torch.optim.Adam):
        opt = opt_cls([p], lr=0.3)
        seen = []
        real_step = opt.step

        def step(real_step=real_step, opt=opt, seen=seen):
            seen.append(opt.param_groups[0]["lr"])
            return real_step()

        opt.step = step
        p.grad = torch.ones(3)
        for length in (7, 13, 10):
            with tr.scaled_lr(opt, length):
                opt.step()
        assert seen == pytest.approx([0.21, 0.39, 0.3])
        assert opt.param_groups[0]["lr"] == 0.3  # restored exactly
    # SGD: the step taken is lr * length / num_steps * grad
    opt = torch.optim.SGD([p], lr=0.5)
    with torch.no_grad():
        p.zero_()
    p.grad = torch.ones(3)
    with Truncation("variable_length", 10, 0).scaled_lr(opt, 4):
        opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), -0.2))
    assert Truncation("regular", 10, 0).lr_scale(4) == 1.0


def test_lr_is_restored_when_the_step_fails():
    tr = Truncation("variable_length", num_steps=10, seed=0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(RuntimeError), tr.scaled_lr(opt, 5):
        raise RuntimeError("boom")
    assert opt.param_groups[0]["lr"] == 1.0


def _metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def float64_default():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize("activation", ["tanh", "identity"])
def test_manual_and_autograd_training_give_the_same_metrics(activation, data_dir, tmp_path,
                                                            float64_default):
    """20 epochs of the tiny preset (scratch RNN), trained in float64: the hand-written BPTT
    and autograd give the same loss and gradient norm every epoch to 1e-10 (relative)."""
    runs = {}
    for backward in ("manual", "autograd"):
        out = tmp_path / backward
        cfg = load_config(ROOT / "configs/tiny.yaml",
                          [f"data.data_dir={data_dir}", f"out_dir={out}", "train.epochs=20",
                           "data.max_tokens=300", f"model.backward={backward}",
                           f"model.activation={activation}", "train.predict_every=0"])
        train(cfg, quiet=True)
        runs[backward] = _metrics(out)
    manual, autograd = runs["manual"], runs["autograd"]
    assert len(manual) == len(autograd) == 20
    assert manual[-1]["train_loss"] < manual[0]["train_loss"] - 0.3  # it did learn
    for a, b in zip(manual, autograd):
        for key in ("train_loss", "grad_norm", "clipped_frac"):
            assert a[key] == pytest.approx(b[key], rel=1e-10, abs=1e-12), (a["epoch"], key)


@pytest.mark.parametrize("strategy, extra", [
    ("randomized", ["train.truncation_pi=0.4"]),
    ("variable_length", ["train.variable_length_min=3"]),
])
def test_strategies_train_deterministically_through_the_trainer(strategy, extra, data_dir,
                                                                tmp_path):
    runs = []
    for i in range(2):
        cfg = load_config(ROOT / "configs/tiny.yaml",
                          [f"data.data_dir={data_dir}", f"out_dir={tmp_path / str(i)}",
                           f"train.truncation={strategy}", "data.max_tokens=300",
                           "train.epochs=3", "train.predict_every=0", *extra])
        train(cfg, quiet=True)
        runs.append([(r["train_loss"], r["grad_norm"]) for r in _metrics(tmp_path / str(i))])
    assert runs[0] == runs[1]
    regular = load_config(ROOT / "configs/tiny.yaml",
                          [f"data.data_dir={data_dir}", f"out_dir={tmp_path / 'r'}",
                           "data.max_tokens=300", "train.epochs=3", "train.predict_every=0"])
    train(regular, quiet=True)
    assert runs[0] != [(r["train_loss"], r["grad_norm"]) for r in _metrics(tmp_path / "r")]


@pytest.mark.parametrize("strategy", ["randomized", "variable_length"])
def test_stopped_mid_epoch_and_resumed_equals_uninterrupted(strategy, data_dir, tmp_path):
    """xi is seeded by the absolute batch index and the variable cuts are replayed from the
    epoch's generator, so a run stopped inside an epoch resumes bit for bit."""
    from rnnlm.checkpoint import CheckpointError
    from rnnlm.training.interrupts import TrainingInterrupted
    from tests.training.test_resume import StopAfter, records, resume

    def cfg(out):
        return load_config(ROOT / "configs/tiny.yaml",
                           [f"data.data_dir={data_dir}", f"out_dir={out}", "train.epochs=3",
                            f"train.truncation={strategy}", "train.variable_length_min=3",
                            "data.max_tokens=500", "train.predict_every=0",
                            "train.threads=1"])

    train(cfg(tmp_path / "whole"), quiet=True)
    whole = records(tmp_path / "whole")
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg(tmp_path / "stopped"), quiet=True, stop=StopAfter(whole[1]["step"] + 5))
    assert info.value.epoch == 2 and info.value.batch > 0  # inside the third epoch
    other = "regular" if strategy == "variable_length" else "variable_length"
    with pytest.raises(CheckpointError, match="train.truncation"):  # cuts would move
        resume(tmp_path / "stopped", f"train.truncation={other}")
    resume(tmp_path / "stopped")
    assert records(tmp_path / "stopped") == whole
