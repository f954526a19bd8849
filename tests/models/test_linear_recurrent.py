"""The linear recurrences (rnnlm/models/linear_recurrent.py: lru, mingru, minlstm) behind the
model contract: the parallel scan equals the step-by-step recurrence in float64 (outputs, next
state, gradients), the hand-written backward equals autograd, windows carry their state, one
token at a time equals a window, and a real run trains, resumes exactly, samples and is
diagnosed through the public API and the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import rnnlm
from rnnlm.cli import main as cli_main
from rnnlm.config import ConfigError, ModelConfig, config_from_dict, load_config
from rnnlm.diagnostics.gradients import eigenvalues, spectral_summary, state_gradient_norms
from rnnlm.models import MODEL_KINDS, build_model, detach_state
from rnnlm.models.linear_recurrent import LinearRecurrentLM, LRURecurrence
from tests.conftest import ROOT

KINDS = ["lru", "mingru", "minlstm"]
V, H, LAYERS, BATCH = 11, 6, 2, 2
TOL = dict(atol=1e-10, rtol=1e-10)
pytestmark = pytest.mark.xdist_group("test_linear_recurrent")


def make(kind, backward="manual", embedding_dim=5, num_layers=LAYERS, hidden_size=H, **kw):
    cfg = ModelConfig(kind=kind, hidden_size=hidden_size, num_layers=num_layers,
                      embedding_dim=embedding_dim, backward=backward, **kw)
    return build_model(cfg, V)


def long_memory(model: LinearRecurrentLM) -> LinearRecurrentLM:
    """minGRU's and minLSTM's coefficients a_t near 1 (0.88-0.99 at rest), so that gradients
    cross a 100-step window measurably; the LRU's ring already reaches 0.999."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for block in model.blocks:
            rec = block.recurrence
            if hasattr(rec, "gate_rows"):
                lift = 2 + 3 * torch.rand(rec.gate_rows * rec.width, generator=g)
                if rec.gate_rows == 2:  # minLSTM: forget gate open, input gate shut
                    lift[rec.width:] *= -1
                else:  # minGRU: update gate z = sigmoid(k) mostly shut
                    lift = -lift
                rec.proj.bias[: rec.gate_rows * rec.width] = lift.to(rec.proj.bias.dtype)
    return model


def run_window(model, X, init, weights):
    """Logits, final state and the gradients of a loss over both (parameters and the
    initial state), float64."""
    model.zero_grad(set_to_none=True)
    state = tuple(s.clone().requires_grad_(True) for s in init)
    logits, final = model(X, state)
    loss = (logits * weights[0]).sum() + sum((f * w).sum() for f, w in zip(final, weights[1:]))
    loss.backward()
    return (logits.detach(), [f.detach() for f in final],
            [p.grad.clone() for p in model.parameters()], [s.grad for s in state])


def assert_same(got, want):
    logits, final, grads, state_grads = got
    torch.testing.assert_close(logits, want[0], **TOL)
    for a, b in zip(final + grads + state_grads, want[1] + want[2] + want[3]):
        torch.testing.assert_close(a, b, **TOL)


def window_problem(model, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, V, (BATCH, T), generator=g)
    init = tuple(torch.randn(LAYERS, BATCH, H, generator=g, dtype=torch.float64)
                 for _ in range(model.state_size))
    weights = [torch.randn(T, BATCH, V, generator=g, dtype=torch.float64)] + \
        [torch.randn(LAYERS, BATCH, H, generator=g, dtype=torch.float64) for _ in init]
    return X, init, weights


# ------------------------------------------------------------------ the contract


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layers, emb", [(1, None), (2, 5), (3, H)])
def test_shapes_and_the_state_contract(kind, layers, emb):
    torch.manual_seed(0)
    model = make(kind, embedding_dim=emb, num_layers=layers, dropout=0.1)
    cls = MODEL_KINDS[kind]
    assert model.state_size == (2 if kind == "lru" else 1) == cls.state_size
    state = model.begin_state(BATCH)
    assert len(state) == model.state_size
    assert all(s.shape == (layers, BATCH, H) and not s.any() for s in state)
    X = torch.randint(0, V, (BATCH, 9))
    logits, new = model(X, state)
    assert logits.shape == (9, BATCH, V) and logits.dtype == torch.float32
    assert [s.shape for s in new] == [s.shape for s in state]
    assert all(s.dtype == torch.float32 and s.requires_grad for s in new)
    assert not any(s.requires_grad for s in detach_state(new))
    # honest declarations: a scan, no step loop, no C kernels, no DropConnect
    s = cls.supports
    assert s.manual_backward and not (s.step_by_step or s.c_windows or s.bf16 or s.compile)
    assert not s.randomized_truncation and not s.weight_dropout


@pytest.mark.parametrize("kind", KINDS)
def test_first_loss_is_close_to_log_vocab_and_backward_is_chosen(kind):
    torch.manual_seed(0)
    model = make(kind, backward="auto", hidden_size=32)
    assert model.backward == "manual"  # auto: the hand-written backward in fp32, eager
    assert make(kind, backward="autograd").backward == "autograd"
    X, Y = torch.randint(0, V, (8, 10)), torch.randint(0, V, (8, 10))
    logits, _ = model(X, model.begin_state(8))
    loss = F.cross_entropy(logits.reshape(-1, V), Y.t().reshape(-1)).item()
    assert abs(loss - math.log(V)) < 0.1


# ------------------------------------------------------------------ the scan is the recurrence


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1, 7, 35, 100])
def test_scan_equals_the_step_by_step_recurrence_float64(kind, T):
    """Outputs, next state and every gradient of the parallel scan, with the hand-written
    backward (manual) and through autograd (minGRU, minLSTM: in log space), equal the plain
    loop h_t = a_t * h_(t-1) + b_t to 1e-10."""
    torch.manual_seed(T)
    model = long_memory(make(kind).double())
    X, init, weights = window_problem(model, T, seed=T)
    model.backward = "loop"
    want = run_window(model, X, init, weights)
    assert all(g.abs().max() > 0 for g in want[3])  # the carried state gets gradient
    for how in ("manual", "autograd"):
        model.backward = how
        assert_same(run_window(model, X, init, weights), want)


@pytest.mark.parametrize("kind", KINDS)
def test_hand_written_backward_equals_autograd(kind):
    torch.manual_seed(1)
    manual = long_memory(make(kind, backward="manual").double())
    auto = make(kind, backward="autograd").double()
    auto.load_state_dict(manual.state_dict())
    X, init, weights = window_problem(manual, 35, seed=1)
    assert_same(run_window(manual, X, init, weights), run_window(auto, X, init, weights))


@pytest.mark.parametrize("kind", KINDS)
def test_the_scan_check_can_fail(kind):
    """Not vacuous: a coefficient nudged by 1e-6 in the loop is seen."""
    torch.manual_seed(2)
    model = make(kind).double()
    X, init, weights = window_problem(model, 7)
    want = run_window(model, X, init, weights)
    with torch.no_grad():
        rec = model.blocks[0].recurrence
        (rec.nu_log if isinstance(rec, LRURecurrence) else rec.proj.bias)[0] += 1e-6
    got = run_window(model, X, init, weights)
    assert (got[0] - want[0]).abs().max() > 1e-10


@pytest.mark.parametrize("kind", KINDS)
def test_two_windows_with_the_state_carried_equal_one_long_window(kind):
    torch.manual_seed(3)
    model = long_memory(make(kind).double())
    X, init, _ = window_problem(model, 12, seed=3)
    long, long_final = model(X, init)
    first, state = model(X[:, :5], init)
    second, final = model(X[:, 5:], state)
    torch.testing.assert_close(torch.cat([first, second]), long, **TOL)
    for a, b in zip(final, long_final):
        torch.testing.assert_close(a, b, **TOL)
    # without detaching, the gradient crosses the boundary as in the long window
    g_long = torch.autograd.grad(long.sum(), list(model.parameters()))
    g_two = torch.autograd.grad(torch.cat([first, second]).sum(), list(model.parameters()))
    for a, b in zip(g_two, g_long):
        torch.testing.assert_close(a, b, **TOL)
    # detached (regular truncation), the forward pass is still the long window's
    again, _ = model(X[:, 5:], detach_state(state))
    torch.testing.assert_close(again, second, **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_one_token_at_a_time_equals_the_window(kind):
    """Sampling's decoder runs one-token windows (T = 1) and carries the state."""
    torch.manual_seed(4)
    model = long_memory(make(kind, dropout=0.3).double())
    ids = torch.randint(0, V, (15,))
    model.eval()
    with torch.no_grad():
        want = model(ids.view(1, -1), model.begin_state(1))[0][:, 0]
    decoder = model.decoder()
    got = torch.cat([decoder.step(int(i)) for i in ids])
    torch.testing.assert_close(got, want, **TOL)
    decoder = model.decoder()
    got = [decoder.feed(ids[:6])] + [decoder.step(int(i)) for i in ids[6:]]
    torch.testing.assert_close(torch.cat(got), want[5:], **TOL)


# ------------------------------------------------------------------ what the diagnostics ask


@pytest.mark.parametrize("kind", KINDS)
def test_step_logits_read_the_state_after_the_step(kind):
    torch.manual_seed(5)
    model = make(kind).double().eval()
    X, init, _ = window_problem(model, 1)
    logits, state = model(X, init)
    state = tuple(s.detach().requires_grad_(True) for s in state)
    read = model.step_logits(X[:, 0], state)
    torch.testing.assert_close(read, logits[0], **TOL)
    grad = torch.autograd.grad(read.sum(), state[0])[0]
    assert grad[-1].abs().max() > 0  # dL/dh_t takes the output's path


def test_eigenvalues_are_the_exact_diagonal():
    torch.manual_seed(6)
    lru = make("lru", hidden_size=64)
    lam = lru.eigenvalues(0)[""]
    assert lam.dtype == torch.complex128 and lam.shape == (64,)
    r, phase = lam.abs(), lam.angle()
    assert (r >= LRURecurrence.R_MIN - 1e-6).all() and (r <= LRURecurrence.R_MAX + 1e-6).all()
    assert (phase > 0).all() and (phase <= LRURecurrence.MAX_PHASE + 1e-6).all()
    rec = lru.blocks[0].recurrence
    # gamma normalisation at initialisation: |gamma|^2 + |lambda|^2 = 1
    torch.testing.assert_close(torch.exp(2 * rec.gamma_log.double()), 1 - r ** 2,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.diagonal(lru.recurrent_weight(0)), lam)
    for kind in ("mingru", "minlstm"):
        ev = make(kind).eigenvalues(1)[""]
        assert (ev.imag == 0).all() and (ev.real > 0).all() and (ev.real < 1).all()
    # the diagnostics' spectra, one block per layer, inside the unit disk
    blocks = eigenvalues(lru)
    assert list(blocks) == ["l0", "l1"]
    assert all(abs(b[0]) == max(abs(b)) for b in blocks.values())
    assert all(rho < 1 for rho in spectral_summary(lru)["diag_rho"].values())


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_norms_against_distance_are_measured(kind):
    torch.manual_seed(8)
    model = make(kind)
    X, Y = torch.randint(0, V, (3, 12)), torch.randint(0, V, (3, 12))
    total, last = state_gradient_norms(model, X, Y)
    assert len(total) == len(last) == 12
    assert all(math.isfinite(v) for v in total + last) and total[0] > 0 and last[0] > 0


# ------------------------------------------------------------------ configs and refusals


@pytest.mark.parametrize("override, fragment", [
    ("model.weight_dropout=0.3", "model.weight_dropout (DropConnect on W_hh) is offered for"),
    ("train.truncation=randomized", "train.truncation: randomized scales each step's"),
    ("train.precision=bf16", "train.precision: bf16 is not offered for lru"),
    ("train.compile=true", "train.compile is not offered for lru"),
    ("model.cell_kernel=c", "model.cell_kernel: c is offered for"),
])
def test_what_is_not_offered_is_one_line_and_exit_code_2(override, fragment, capsys):
    with pytest.raises(ConfigError, match="lru"):
        config_from_dict({}, ["model.kind=lru", override])
    with pytest.raises(SystemExit) as stop:
        cli_main(["train", "--config", str(ROOT / "configs/tiny.yaml"), "--set",
                  "model.kind=lru", "--set", override])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]


def test_presets_match_the_held_out_lstm():
    lstm = load_config(ROOT / "configs/heldout_lstm_spaced.yaml")
    vocab = 28  # d2l_spaced: 26 letters, space, <unk>
    lstm_params = sum(p.numel() for p in build_model(lstm.model, vocab).parameters())
    for kind in KINDS:
        cfg = load_config(ROOT / f"configs/{kind}.yaml")
        assert cfg.model.kind == kind and cfg.out_dir == f"runs/{kind}"
        assert cfg.data == lstm.data
        for key in ("epochs", "optimizer", "lr", "weight_decay", "lr_schedule", "lr_min",
                    "ema_decay", "clip_norm"):
            assert getattr(cfg.train, key) == getattr(lstm.train, key), key
        params = sum(p.numel() for p in build_model(cfg.model, vocab, cfg.train).parameters())
        assert abs(params / lstm_params - 1) < 0.02, (kind, params, lstm_params)


# ------------------------------------------------------------------ a real run


SETTINGS = {"train.threads": 1, "data.max_tokens": 600, "train.optimizer": "adam",
            "train.lr": 0.01, "model.hidden_size": 16, "model.num_layers": 2,
            "model.embedding_dim": 8, "model.dropout": 0.1, "train.predict_every": 0,
            "train.predict_chars": 20}


def train_losses(run) -> list[float]:
    return [r["train_loss"] for r in run.metrics]


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_trains_resumes_exactly_samples_and_is_diagnosed(kind, tmp_path,
                                                               time_machine_path, capsys):
    settings = {**SETTINGS, "model.kind": kind, "data.data_dir": str(time_machine_path.parent),
                "train.auto_resume": True}
    config = ROOT / "configs" / "tiny.yaml"
    whole = rnnlm.train(config, out_dir=tmp_path / "whole", epochs=3, quiet=True,
                        overrides=settings)
    losses = train_losses(whole)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.1
    # the same run stopped after 2 epochs and continued from last.pt computes the same
    rnnlm.train(config, out_dir=tmp_path / "parts", epochs=2, quiet=True, overrides=settings)
    parts = rnnlm.train(config, out_dir=tmp_path / "parts", epochs=3, quiet=True,
                        overrides=settings)
    assert train_losses(parts) == losses
    a, b = (torch.load(tmp_path / name / "last.pt", weights_only=True)["model"]
            for name in ("whole", "parts"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    last = str(tmp_path / "whole" / "last.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli_main(["sample", "--checkpoint", last, "--prefix", "the time", "--num-chars", "30",
                  "--temperature", "0.8", "--seed", "1", "--device", "cpu"])
    assert stop.value.code == 0
    text = capsys.readouterr().out.strip()
    assert text.startswith("the time") and len(text) == len("the time") + 30
    assert text == rnnlm.generate(rnnlm.load(last, device="cpu"), "the time", 30,
                                  temperature=0.8, seed=1)

    with pytest.raises(SystemExit) as stop:
        cli_main(["diagnose", "--checkpoint", last, "--out", str(tmp_path / "diag")])
    assert stop.value.code == 0
    summary = json.loads((tmp_path / "diag" / "diagnostics.json").read_text())
    assert set(summary["eig_final"]) == {"l0", "l1"}
    assert all(math.hypot(*ev) < 1 for evs in summary["eig_final"].values() for ev in evs)


@pytest.mark.parametrize("kind", KINDS)
def test_random_iteration_trains(kind, tmp_path, time_machine_path):
    run = rnnlm.train(ROOT / "configs" / "tiny.yaml", out_dir=tmp_path / "run", epochs=2,
                      quiet=True, overrides={**SETTINGS, "model.kind": kind,
                                             "data.iterator": "random",
                                             "data.data_dir": str(time_machine_path.parent)})
    losses = train_losses(run)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert losses[1] < losses[0]
