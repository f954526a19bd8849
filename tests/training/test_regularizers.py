"""train.ar, train.tar (AWD-LSTM's activation penalties) and train.rdrop (R-Drop): the
formulas, the gradients the step computes against the objective written out by hand, every
backward (hand-written, C windows, autograd) and the lane shards agreeing, R-Drop's pairs of
lanes and their carried state, the checks, and runs that use them."""

import pytest
import torch
import torch.nn.functional as F

from rnnlm.checkpoint import load_checkpoint
from rnnlm.config import ConfigError, config_from_dict, load_config
from rnnlm.kernels import native
from rnnlm.models import MODEL_KINDS, build_model
from rnnlm.training.interrupts import TrainingInterrupted
from rnnlm.training.run import train
from rnnlm.training.step import Regularizers, ShardedForwardBackward, forward_backward, twice
from tests.conftest import ROOT, spy_on_c_loops
from tests.training.test_epoch import read_metrics
from tests.training.test_resume import StopAfter, records, resume, tiny

PENALISED = [kind for kind, cls in MODEL_KINDS.items() if cls.supports.activation_penalties]
REFUSED = [kind for kind in MODEL_KINDS if kind not in PENALISED]


def test_the_penalty_is_the_written_out_formula():
    torch.manual_seed(0)
    hidden, dropped = torch.randn(6, 3, 4), torch.randn(6, 3, 4)
    expected = 2.0 * (dropped ** 2).sum() / dropped.numel() + \
        0.5 * ((hidden[1:] - hidden[:-1]) ** 2).sum() / (5 * 3 * 4)
    assert Regularizers(2.0, 0.5).penalty(hidden, dropped).item() == pytest.approx(expected.item())
    # one step: no change to penalise, only AR; nothing at all when both are off
    assert Regularizers(2.0, 0.5).penalty(hidden[:1], dropped[:1]).item() == \
        pytest.approx(2.0 * (dropped[:1] ** 2).mean().item())
    assert not Regularizers() and Regularizers(0.0, 1.0) and Regularizers(1.0, 0.0)


def small_model(kind: str, *overrides: str):
    cfg = config_from_dict({}, [f"model.kind={kind}", "model.hidden_size=6",
                                "model.num_layers=2", "model.embedding_dim=5", *overrides])
    return build_model(cfg.model, 9)


def batch(model, seed: int = 1):
    torch.manual_seed(seed)
    X, Y = torch.randint(0, 9, (4, 7)), torch.randint(0, 9, (4, 7))
    state = tuple(0.5 * torch.randn_like(s) for s in model.begin_state(4))
    return X, Y, state


def gradients(model, step, X, Y, state, seed: int = 2):
    """(loss, next state, every parameter's gradient) of one step, dropout drawn from `seed`."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, new_state = step(model, X, Y, state)
    return loss.detach(), [s.detach() for s in new_state], \
        [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", PENALISED)
def test_the_step_differentiates_cross_entropy_plus_the_penalties(kind):
    """With dropout everywhere, so that AR sees the outputs after output dropout and TAR
    those before it: the objective written out from the top layer's outputs, caught by a
    hook, has the step's gradients; the loss returned is the cross-entropy alone."""
    torch.manual_seed(0)
    model = small_model(kind, "model.dropout=0.2", "model.input_dropout=0.1",
                        "model.output_dropout=0.3").double().train()
    X, Y, state = batch(model)
    penalties = Regularizers(1.5, 0.7)
    step = gradients(model, lambda *a: forward_backward(*a, regularizers=penalties), X, Y, state)

    caught = {}
    hook = model.output_dropout.register_forward_hook(
        lambda module, inputs, output: caught.update(hidden=inputs[0], dropped=output))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    logits, _ = model(X, state)
    hook.remove()
    cross_entropy = F.cross_entropy(logits.reshape(-1, 9), Y.t().reshape(-1))
    h, d = caught["hidden"], caught["dropped"]
    assert not torch.equal(h, d)  # output dropout did act
    objective = cross_entropy + 1.5 * d.pow(2).mean() + 0.7 * (h[1:] - h[:-1]).pow(2).mean()
    objective.backward()

    torch.testing.assert_close(step[0], cross_entropy.detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip(step[2], [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def assert_same_penalised_step(model, reference, **tolerance):
    """One step with strong penalties gives `model` and `reference` (the same weights, another
    backward) the same next state and gradients."""
    X, Y, state = batch(model)
    step = lambda *a: forward_backward(*a, regularizers=Regularizers(3.0, 2.0))  # noqa: E731
    ours, theirs = gradients(model, step, X, Y, state), gradients(reference, step, X, Y, state)
    for a, b in zip(ours[1] + ours[2], theirs[1] + theirs[2]):
        torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.parametrize("kind", [k for k in PENALISED if MODEL_KINDS[k].supports.manual_backward])
def test_the_hand_written_backward_takes_the_penalties_gradient(kind):
    """The penalties add a gradient on every output h_t, not only through the logits: the
    hand-written BPTT must carry it back as autograd does."""
    torch.manual_seed(0)
    manual = small_model(kind, "model.backward=manual").double()
    reference = small_model(kind, "model.backward=autograd").double()
    reference.load_state_dict(manual.state_dict())
    assert_same_penalised_step(manual, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", [k for k, c in MODEL_KINDS.items()
                                  if c.supports.c_windows and c.supports.activation_penalties])
@pytest.mark.skipif(not native.windows_available(), reason="no C window loops here")
def test_the_c_windows_take_the_penalties_gradient(kind, monkeypatch):
    calls = spy_on_c_loops(monkeypatch, ("rnn", "gru", "lstm"))
    torch.manual_seed(0)
    windows = small_model(kind, "model.cell_kernel=c")
    reference = small_model(kind, "model.cell_kernel=torch")
    if MODEL_KINDS[kind].supports.manual_backward:
        reference = small_model(kind, "model.cell_kernel=torch", "model.backward=autograd")
    reference.load_state_dict(windows.state_dict())
    calls.clear()  # what the reference (PyTorch's ops) and the model built before it did
    assert_same_penalised_step(windows, reference, rtol=2e-4, atol=2e-6)
    assert any(name.endswith("_backward_loop") for name in calls)  # the C backward ran


@pytest.mark.parametrize("kind", ["lstm_scratch", "gru"])
def test_lane_shards_weigh_the_penalties_as_one_batch_does(kind):
    torch.manual_seed(0)
    model = small_model(kind).double()
    X, Y, state = batch(model)
    penalties = Regularizers(2.0, 1.0)
    sharded = ShardedForwardBackward(2, regularizers=penalties)
    try:
        one = gradients(model, lambda *a: forward_backward(*a, regularizers=penalties),
                        X, Y, state)
        two = gradients(model, sharded, X, Y, state)
    finally:
        sharded.close()
    torch.testing.assert_close(one[0], two[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(one[1] + one[2], two[1] + two[2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("setting, message", [
    ("train.ar=-1", "train.ar must be >= 0"),
    ("train.tar=-0.5", "train.tar must be >= 0"),
])
def test_negative_penalties_are_refused(setting, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({}, [setting])


@pytest.mark.parametrize("kind", REFUSED)
def test_kinds_without_recurrent_top_outputs_refuse_them(kind):
    with pytest.raises(ConfigError, match=f"train.ar .* {kind}'s top output is a LayerNorm's"):
        config_from_dict({}, [f"model.kind={kind}", "train.ar=1"])


def test_a_run_with_penalties_trains_otherwise(tiny_overrides, tmp_path):
    """Not an option read and ignored: the same run with and without them ends elsewhere,
    and its reported training loss stays a cross-entropy (the penalties are not in it)."""
    losses = {}
    for name, sets in [("plain", []), ("penalised", ["train.ar=4", "train.tar=4"])]:
        cfg = load_config(ROOT / "configs/tiny.yaml",
                          [*tiny_overrides, f"out_dir={tmp_path / name}", "train.epochs=2",
                           *sets])
        train(cfg, quiet=True)
        losses[name] = [r["train_loss"] for r in read_metrics(tmp_path / name)
                        if "train_loss" in r]
    assert losses["plain"][0] != losses["penalised"][0]
    assert all(0 < loss < 4 for loss in losses["penalised"])  # ln 28 = 3.3: no penalty in it


def test_the_consistency_is_the_symmetric_kl_of_each_pair():
    torch.manual_seed(0)
    logits = torch.randn(5, 6, 9, dtype=torch.float64)  # 3 lanes, copies side by side
    p, q = F.log_softmax(logits[:, 0::2], -1), F.log_softmax(logits[:, 1::2], -1)
    kl_pq = (p.exp() * (p - q)).sum(-1).mean()
    kl_qp = (q.exp() * (q - p)).sum(-1).mean()
    assert Regularizers.consistency(logits).item() == pytest.approx(0.5 * (kl_pq + kl_qp).item())
    same = logits.clone()
    same[:, 1::2] = same[:, 0::2]
    assert Regularizers.consistency(same).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("kind", ["lstm", "gru_scratch", "mingru"])
def test_rdrop_runs_every_lane_twice_and_differentiates_the_written_out_objective(kind):
    torch.manual_seed(0)
    model = small_model(kind, "model.dropout=0.2", "model.output_dropout=0.3").double().train()
    X, Y, state = batch(model)
    rdrop = Regularizers(rdrop=0.8)
    step = gradients(model, lambda *a: forward_backward(*a, regularizers=rdrop), X, Y, state)
    assert step[1][0].shape[1] == 2 * X.shape[0]  # each lane's two copies carry their states

    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    X2, Y2 = X.repeat_interleave(2, 0), Y.repeat_interleave(2, 0)
    logits, _ = model(X2, tuple(s.repeat_interleave(2, 1) for s in state))
    cross_entropy = F.cross_entropy(logits.reshape(-1, 9), Y2.t().reshape(-1))
    p, q = F.log_softmax(logits[:, 0::2], -1), F.log_softmax(logits[:, 1::2], -1)
    assert not torch.allclose(p, q)  # the copies saw different dropout
    symmetric_kl = 0.5 * ((p.exp() * (p - q)).sum(-1).mean() + (q.exp() * (q - p)).sum(-1).mean())
    (cross_entropy + 0.8 * symmetric_kl).backward()
    torch.testing.assert_close(step[0], cross_entropy.detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip(step[2], [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_a_carried_pair_state_is_kept_and_pairs_stay_side_by_side():
    X, Y = torch.arange(6).reshape(3, 2), torch.arange(6).reshape(3, 2) + 1
    fresh = (torch.tensor([[[1.0], [2.0], [3.0]]]),)  # (layers, lanes, units)
    X2, Y2, state = twice(X, Y, fresh)
    assert X2[:, 0].tolist() == [0, 0, 2, 2, 4, 4] and Y2[:, 1].tolist() == [2, 2, 4, 4, 6, 6]
    assert state[0][0, :, 0].tolist() == [1, 1, 2, 2, 3, 3]
    carried = (torch.arange(6.0).reshape(1, 6, 1),)
    assert twice(X, Y, carried)[2][0] is carried[0]  # the copies' own states, untouched


@pytest.mark.parametrize("overrides, message", [
    (["train.rdrop=-1"], "train.rdrop must be >= 0"),
    (["train.rdrop=1", "model.weight_dropout=0.3"], "train.rdrop compares two dropout samples"),
    (["train.rdrop=1", "model.num_layers=1", "model.dropout=0.3"],
     "train.rdrop compares two dropout samples"),  # between layers: none with one layer
])
def test_rdrop_is_refused_where_it_cannot_act(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({}, ["model.kind=lstm", *overrides])


def test_rdrop_takes_the_dropout_that_acts():
    config_from_dict({}, ["model.kind=lstm", "model.num_layers=2", "model.dropout=0.3",
                          "train.rdrop=1"])
    config_from_dict({}, ["model.kind=mingru", "model.num_layers=1", "model.dropout=0.3",
                          "train.rdrop=1"])  # on every residual branch, one block or more


def test_a_run_with_regularizers_stopped_mid_epoch_resumes_exactly(data_dir, tmp_path):
    """R-Drop's carried state holds both copies of every lane: a checkpoint taken inside an
    epoch must give them back, so the resumed run equals the uninterrupted one bit for bit."""
    sets = ["train.rdrop=1", "train.ar=1", "train.tar=1", "train.epochs=4"]
    whole = tmp_path / "whole"
    train(tiny(data_dir, whole, *sets), quiet=True)
    expected = records(whole)
    out = tmp_path / "stopped"
    with pytest.raises(TrainingInterrupted):
        train(tiny(data_dir, out, *sets), quiet=True, stop=StopAfter(expected[1]["step"] + 9))
    progress = load_checkpoint(out / "last.pt")["progress"]
    assert progress["epoch"] == 2 and progress["batch"] > 0
    lanes = tiny(data_dir, out, *sets).data.batch_size
    assert progress["partial"]["state"][0].shape[1] == 2 * lanes  # both copies were saved
    with pytest.raises(ConfigError, match="train.rdrop"):  # those two states need R-Drop
        resume(out, "train.rdrop=0")
    resume(out)
    assert records(out) == expected


def test_a_run_with_rdrop_trains_otherwise(tiny_overrides, tmp_path):
    sets = ["model.embedding_dim=8", "model.output_dropout=0.3", "train.epochs=2"]
    losses = {}
    for name, more in [("plain", []), ("rdrop", ["train.rdrop=1"])]:
        cfg = load_config(ROOT / "configs/tiny.yaml",
                          [*tiny_overrides, f"out_dir={tmp_path / name}", *sets, *more])
        train(cfg, quiet=True)
        losses[name] = [r["train_loss"] for r in read_metrics(tmp_path / name)
                        if "train_loss" in r]
    assert losses["plain"][0] != losses["rdrop"][0]
