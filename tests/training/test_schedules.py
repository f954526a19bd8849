"""Learning-rate schedules, early stopping, weight averaging and the extra dropout layers."""

import json
import math

import pytest
import torch

import rnnlm.training.run
from rnnlm.config import ConfigError, config_from_dict, load_config
from rnnlm.models import MODEL_KINDS, build_model
from rnnlm.models.base import LockedDropout, drop, keep_mask
from rnnlm.training.averaging import WeightAverage
from rnnlm.training.best import EarlyStopping
from rnnlm.training.run import train
from rnnlm.training.schedules import LRSchedule
from tests.conftest import ROOT


def lrs_over(overrides, epochs, val=None):
    cfg = config_from_dict({}, [f"train.epochs={epochs}", "train.lr=1.0", *overrides])
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.train.lr)
    schedule = LRSchedule(cfg.train, opt)
    seen = []
    for epoch in range(epochs):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()  # (no gradient: nothing moves) torch expects a step before the schedule's
        schedule.after_epoch(None if val is None else val[epoch])
    return seen


def test_none_is_constant():
    assert lrs_over([], 4) == [1.0] * 4


def test_step_decays_every_step_size_epochs():
    got = lrs_over(["train.lr_schedule=step", "train.lr_step_size=2", "train.lr_gamma=0.5"], 6)
    assert got == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])


def test_cosine_goes_from_lr_to_lr_min():
    got = lrs_over(["train.lr_schedule=cosine", "train.lr_min=0.1"], 5)
    expected = [0.1 + 0.9 * (1 + math.cos(math.pi * e / 5)) / 2 for e in range(5)]
    assert got == pytest.approx(expected)


def test_saved_schedule_continues_and_another_kind_starts_afresh():
    def schedule(kind):
        cfg = config_from_dict({}, ["train.epochs=6", "train.lr=1.0", "train.lr_min=0.1",
                                    f"train.lr_schedule={kind}", "train.lr_step_size=1",
                                    "train.lr_gamma=0.5"])
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.train.lr)
        return LRSchedule(cfg.train, opt), opt

    first, _ = schedule("cosine")
    for _ in range(3):
        first.scheduler.optimizer.step()
        first.after_epoch(None)
    resumed, _ = schedule("cosine")
    resumed.load_state_dict(first.state_dict())
    assert resumed.scheduler.last_epoch == 3
    switched, opt = schedule("step")
    switched.load_state_dict(first.state_dict())  # a cosine state means nothing to step
    assert switched.scheduler.last_epoch == 0 and opt.param_groups[0]["lr"] == 1.0


def test_plateau_decays_after_patience_and_only_on_evaluations():
    val = [5.0, 4.0, 4.5, None, 4.6, 4.7, 4.8, 3.0]
    got = lrs_over(["train.lr_schedule=plateau", "train.plateau_patience=1",
                    "train.lr_gamma=0.5", "train.lr_min=0.3", "data.split=[0.8,0.1,0.1]"],
                   8, val=val)
    # Epochs 3 and 5 are two bad evaluations in a row, more than the patience of 1 (epoch 4
    # was not evaluated): the lr halves for epoch 6; two more bad ones halve it again, but
    # not below lr_min.
    assert got == pytest.approx([1, 1, 1, 1, 1, 0.5, 0.5, 0.3])


def test_early_stopping_counts_evaluations_without_improvement():
    stop = EarlyStopping(2)
    assert [stop.should_stop(v) for v in [5, 4, 4.1, 3.9, 4, 4]] == [False] * 5 + [True]
    never = EarlyStopping(None)
    assert not any(never.should_stop(v) for v in [1, 2, 3, 4, 5])


@pytest.mark.parametrize("overrides, fragment", [
    (["train.lr_schedule=plateau"], "plateau follows validation perplexity, but there is no "
                                    "validation split"),
    (["train.early_stop_patience=3"], "early_stop_patience watches validation perplexity"),
    (["train.early_stop_patience=3", "data.split=[0.9,0,0.1]"], "no validation split"),
    (["train.lr_schedule=warmup"], "train.lr_schedule must be one of none, step, cosine"),
    (["train.lr_gamma=1.5"], "train.lr_gamma must be in (0, 1)"),
    (["train.lr_step_size=0"], "train.lr_step_size must be >= 1"),
    (["train.lr_schedule=cosine", "train.lr_min=2"], "train.lr_min (2.0) must be below"),
    (["train.early_stop_patience=0", "data.split=[0.8,0.1,0.1]"], "must be >= 1 or null"),
    (["train.ema_decay=1"], "train.ema_decay must be in (0, 1)"),
    (["model.input_dropout=0.2"], "model.input_dropout needs model.embedding_dim"),
    (["model.output_dropout=1"], "model.output_dropout must be in [0, 1)"),
    (["model.weight_dropout=-0.1"], "model.weight_dropout must be in [0, 1)"),
    (["model.dropout_masks=sometimes"], "model.dropout_masks must be one of per_step, locked"),
])
def test_nonsense_combinations_are_refused_at_load(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        config_from_dict({}, overrides)
    assert fragment in str(info.value)


def read_records(out_dir):
    return [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_early_stopping_ends_the_run(tiny_overrides, tmp_path, monkeypatch):
    """Scripted validation losses: best at epoch 2, then two evaluations without
    improvement, so the run stops after epoch 4 and tests the epoch-2 weights."""
    script = [2.0, 1.5, 1.6, 1.5]  # then the test split, really evaluated
    real = rnnlm.training.run.evaluate

    def scripted(model, ids, lanes, device):
        result = real(model, ids, lanes, device)
        if script:
            result.loss = script.pop(0)
        return result

    monkeypatch.setattr(rnnlm.training.run, "evaluate", scripted)
    cfg = load_config(ROOT / "configs/tiny.yaml",
                      [*tiny_overrides, "data.split=[0.8,0.1,0.1]", "train.epochs=30",
                       "train.early_stop_patience=2", "model.kind=gru"])
    final = train(cfg, quiet=True)
    records = read_records(tmp_path / "run")
    assert [r["val_loss"] for r in records[:-1]] == [2.0, 1.5, 1.6, 1.5]
    assert records[-1]["event"] == "test" and records[-1]["weights_epoch"] == 2
    assert final["epoch"] == 4 and final["best_epoch"] == 2


def test_the_lr_in_the_log_is_the_optimizer_lr(tiny_overrides, tmp_path):
    cfg = load_config(ROOT / "configs/tiny.yaml",
                      [*tiny_overrides, "train.epochs=4", "train.lr_schedule=step",
                       "train.lr_step_size=1", "train.lr_gamma=0.5"])
    train(cfg, quiet=True)
    assert [r["lr"] for r in read_records(tmp_path / "run")] == [1, 0.5, 0.25, 0.125]


def test_weight_average_follows_the_ema_formula():
    model = torch.nn.Linear(3, 1)
    avg = WeightAverage(model, decay=0.5)
    start = model.weight.detach().clone()
    expected = start.clone()
    for step in range(1, 6):
        with torch.no_grad():
            model.weight.add_(1.0)
        avg.update(model)
        d = min(0.5, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * model.weight.detach()
        assert torch.allclose(avg.model.weight, expected)
    assert not avg.model.weight.requires_grad


def test_ema_run_evaluates_the_average(tiny_overrides, tmp_path):
    runs = {}
    for name, extra in (("plain", []), ("ema", ["train.ema_decay=0.9"])):
        cfg = load_config(ROOT / "configs/tiny.yaml",
                          [*tiny_overrides, f"out_dir={tmp_path / name}", "train.epochs=2",
                           "data.split=[0.8,0.1,0.1]", "model.kind=gru", *extra])
        train(cfg, quiet=True)
        runs[name] = read_records(tmp_path / name)
    # Training never reads the average: identical training losses, different validation.
    assert [r["train_loss"] for r in runs["plain"][:2]] == \
        [r["train_loss"] for r in runs["ema"][:2]]
    assert runs["plain"][1]["val_loss"] != runs["ema"][1]["val_loss"]


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_input_and_output_dropout(kind):
    cfg = config_from_dict({}, [f"model.kind={kind}", "model.hidden_size=16",
                                "model.embedding_dim=8", "model.input_dropout=0.5",
                                "model.output_dropout=0.5"]).model
    torch.manual_seed(0)
    model = build_model(cfg, 10)
    x = torch.randint(0, 10, (3, 7))
    state = model.begin_state(3)
    model.train()
    a, _ = model(x, state)
    b, _ = model(x, state)
    assert not torch.allclose(a, b)  # dropout is active in training
    model.eval()
    c, _ = model(x, state)
    d, _ = model(x, state)
    assert torch.equal(c, d)
    # With no dropout configured the same weights give the eval output in training mode.
    plain = build_model(config_from_dict({}, [f"model.kind={kind}", "model.hidden_size=16",
                                              "model.embedding_dim=8"]).model, 10)
    plain.load_state_dict(model.state_dict())
    plain.train()
    assert torch.allclose(plain(x, state)[0], c, atol=1e-6)


@pytest.mark.parametrize("kind,layered", [(kind, False) for kind, cls in MODEL_KINDS.items()
                                          if cls.supports.weight_dropout] +
                         [(kind, True) for kind in ("rnn", "gru", "lstm")])
def test_weight_dropout_drops_recurrent_weights_once_per_call(kind, layered):
    """layered: torch.nn's layers run one by one (locked masks between them, switched off
    here so that DropConnect draws the only masks)."""
    locked = ["model.dropout=0.5", "model.dropout_masks=locked"] if layered else []
    cfg = config_from_dict({}, [f"model.kind={kind}", "model.hidden_size=12",
                                "model.num_layers=2", "model.weight_dropout=0.5",
                                *locked]).model
    torch.manual_seed(0)
    model = build_model(cfg, 9)
    if layered:
        assert model.layer_by_layer
        model.between.p = 0.0
    x = torch.randint(0, 9, (2, 6))
    state = model.begin_state(2)
    model.train()
    torch.manual_seed(5)
    dropped, _ = model(x, state)
    # The definition: the same masks (same seed, layer by layer), applied by hand to a copy
    # that then runs without any dropout.
    names = [n for n, _ in model.named_parameters() if "weight_hh" in n]
    assert len(names) == 2
    torch.manual_seed(5)
    masked = {n: drop(model.get_parameter(n), 0.5) for n in names}
    twin = build_model(config_from_dict({}, [f"model.kind={kind}", "model.hidden_size=12",
                                             "model.num_layers=2"]).model, 9)
    twin.load_state_dict({**model.state_dict(), **masked})
    twin.eval()
    assert torch.allclose(dropped, twin(x, state)[0], atol=1e-6)
    dropped.sum().backward()  # the gradient reaches the original weights
    assert all(model.get_parameter(n).grad is not None for n in names)
    model.eval()  # no dropout at evaluation
    twin.load_state_dict(model.state_dict())
    assert torch.allclose(model(x, state)[0], twin(x, state)[0], atol=1e-6)


def test_locked_dropout_keeps_one_mask_per_lane_for_the_window():
    torch.manual_seed(0)
    locked = LockedDropout(0.5)
    y = locked(torch.ones(6, 4, 50))  # (T, B, D)
    assert torch.equal(y, y[:1].expand_as(y))  # every step has the first step's mask
    assert set(y.unique().tolist()) == {0.0, 2.0}  # dropped, or kept and scaled by 1/(1-p)
    assert not torch.equal(y[0, 0], y[0, 1])  # lanes draw their own masks
    locked.eval()
    x = torch.randn(6, 4, 50)
    assert torch.equal(locked(x), x)


def dropout_zero_patterns(kind, masks):
    """Which units each dropout layer of a 2-layer model zeroed, per step: {name: (T, B, D)}."""
    cfg = config_from_dict({}, [f"model.kind={kind}", "model.hidden_size=16",
                                "model.num_layers=2", "model.embedding_dim=8",
                                "model.input_dropout=0.5", "model.dropout=0.5",
                                "model.output_dropout=0.5", f"model.dropout_masks={masks}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 10)
    model.train()
    zeros = {}

    def record(name):
        def hook(_module, _args, out):
            zeros[name] = out == 0
        return hook
    for name in ("input_dropout", "between", "output_dropout"):
        model.get_submodule(name).register_forward_hook(record(name))
    model(torch.randint(0, 10, (3, 7)), model.begin_state(3))
    return zeros


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_locked_masks_hold_for_the_whole_window_in_every_dropout_layer(kind):
    """Input, between-layer and output dropout: with locked masks a unit of a lane that is
    dropped at one step is dropped at every step of the window; per-step masks change."""
    for name, zero in dropout_zero_patterns(kind, "locked").items():
        assert zero.any() and not zero.all(), name
        assert torch.equal(zero, zero[:1].expand_as(zero)), name
    for name, zero in dropout_zero_patterns(kind, "per_step").items():
        if name == "between" and kind in ("rnn", "gru", "lstm"):
            continue  # per-step masks between torch.nn's layers are drawn inside the layer
        assert not torch.equal(zero, zero[:1].expand_as(zero)), name


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_torch_nn_layers_run_one_by_one_as_the_fused_layer_does(kind):
    """Locked masks between torch.nn's stacked layers run the layers one at a time: without
    dropout (evaluation) that gives the fused multi-layer call's outputs, state and
    gradients."""
    def make(masks):
        cfg = config_from_dict({}, [f"model.kind={kind}", "model.hidden_size=12",
                                    "model.num_layers=3", "model.embedding_dim=5",
                                    "model.dropout=0.4", f"model.dropout_masks={masks}"])
        return build_model(cfg.model, 9).double().eval()
    torch.manual_seed(0)
    layered, fused = make("locked"), make("per_step")
    assert layered.layer_by_layer and not fused.layer_by_layer
    fused.load_state_dict(layered.state_dict())
    x = torch.randint(0, 9, (4, 6))
    state = tuple(torch.randn_like(s) for s in layered.begin_state(4))
    (out_a, state_a), (out_b, state_b) = layered(x, state), fused(x, state)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-12)
    for a, b in zip(state_a, state_b, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    out_a.square().sum().backward()
    out_b.square().sum().backward()
    for (name, a), b in zip(layered.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_locked_dropout_between_torch_nn_layers_is_one_mask_on_the_lower_output(kind):
    """The definition, in training: layer 0 runs, one (1, B, H) mask scaled by 1/(1-p)
    multiplies its outputs at every step, layer 1 runs on that (and nothing drops after the
    top layer)."""
    cfg = config_from_dict({}, [f"model.kind={kind}", "model.hidden_size=10",
                                "model.num_layers=2", "model.dropout=0.5",
                                "model.dropout_masks=locked"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 7).train()
    tokens = torch.randint(0, 7, (3, 5))
    state = tuple(torch.randn_like(s) for s in model.begin_state(3))
    torch.manual_seed(11)
    logits, final = model(tokens, state)

    torch.manual_seed(11)
    mask = keep_mask((1, 3, 10), 0.5, torch.ones(1))
    layers = [model.layer_class(model.input_size if k == 0 else 10, 10) for k in range(2)]
    x = model.one_hot(tokens.t())
    finals = []
    for k, layer in enumerate(layers):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(layer, f"{name}_l0").data.copy_(getattr(model.rnn, f"{name}_l{k}"))
        hx = tuple(s[k:k + 1] for s in state)
        x, h = layer(x * mask if k > 0 else x, hx if len(hx) == 2 else hx[0])
        finals.append(h if isinstance(h, tuple) else (h,))
    torch.testing.assert_close(logits, model.output(x), rtol=0, atol=1e-6)
    for got, parts in zip(final, zip(*finals, strict=True), strict=True):
        torch.testing.assert_close(got, torch.cat(parts), rtol=0, atol=1e-6)


def test_locked_dropout_trains_with_dropconnect(tiny_overrides, tmp_path):
    cfg = load_config(ROOT / "configs/tiny.yaml",
                      [*tiny_overrides, "model.kind=lstm", "train.predict_every=0",
                       "model.num_layers=2", "model.embedding_dim=8", "model.dropout=0.3",
                       "model.input_dropout=0.2", "model.output_dropout=0.3",
                       "model.weight_dropout=0.3", "model.dropout_masks=locked",
                       "data.split=[0.8,0.1,0.1]", "train.epochs=2"])
    train(cfg, quiet=True)
    records = [r for r in read_records(tmp_path / "run") if "epoch" in r]
    assert len(records) == 2 and all(math.isfinite(r["val_ppl"]) for r in records)
    assert records[1]["train_loss"] < records[0]["train_loss"]
