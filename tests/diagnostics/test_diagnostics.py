"""Gradient-flow diagnostics: the measured ||dL/dh_t|| against the equations of docs/bptt.md
§1, eigenvalues, the truncation pattern, the trainer's records and plots, and diagnose.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rnnlm.bptt.rnn import linear_closed_form_state_grads
from rnnlm.bptt.truncation import Truncation
from rnnlm.config import ConfigError, config_from_dict, load_config
from rnnlm.data.iterators import BatchIterator, VariableLength
from rnnlm.diagnostics.gradients import (
    diagnostic_batch,
    eigenvalues,
    spectral_summary,
    state_gradient_norms,
    truncation_pattern,
)
from rnnlm.diagnostics.plots import (
    load_run,
    plot_eigenvalues,
    plot_gradient_norms,
    plot_truncation_patterns,
    segments,
)
from rnnlm.diagnostics.report import diagnose_checkpoint, pattern_windows
from rnnlm.models import build_model
from rnnlm.training.run import train
from tests.conftest import ROOT, copy_of_time_machine
from tests.models.test_models import copy_into_twin

V = 7


def make(kind, hidden=5, layers=1, **extra):
    cfg = config_from_dict({}, [f"model.kind={kind}", f"model.hidden_size={hidden}",
                                f"model.num_layers={layers}",
                                *[f"model.{k}={v}" for k, v in extra.items()]])
    torch.manual_seed(0)
    model = build_model(cfg.model, V).double()
    with torch.no_grad():  # weights large enough for the recurrence to matter
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def data(B=3, T=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def lane_norms_by_distance(grads):  # (T, B, H) -> [d = 0 .. T-1]
    return grads.norm(dim=-1).mean(dim=-1).flip(0).tolist()


@pytest.mark.parametrize("backward", ["manual", "autograd"])
def test_state_gradients_follow_the_closed_form_of_the_linear_rnn(backward):
    """dL/dh_t = sum_i (W_hh^T)^(i-t) W_qh^T dL/do_i (docs/bptt.md §1, step 3), measured by the
    diagnostic pass, for the window loss and for the last step's loss."""
    model = make("rnn_scratch", activation="identity", backward=backward)
    with torch.no_grad():
        model.layers[0].weight_hh.mul_(0.5)
    X, Y = data()
    total, last = state_gradient_norms(model, X, Y)
    # direct gradients dH_t = W_qh^T dL/do_t from an ordinary full-window forward
    hs, _ = model.core(model.encode(X), model.begin_state(3))
    hs.retain_grad()
    losses = F.cross_entropy(model.output(hs).flatten(0, 1), Y.t().reshape(-1),
                             reduction="none").view(6, 3).mean(dim=1)
    W = model.layers[0].weight_hh.detach()
    for loss, measured in ((losses.mean(), total), (losses[-1], last)):
        hs.grad = None
        loss.backward(retain_graph=True)
        expected = lane_norms_by_distance(linear_closed_form_state_grads(hs.grad, W))
        np.testing.assert_allclose(measured, expected, rtol=1e-10, atol=1e-14)
    # d = 0 is the last step: there dL/dh_T has only the direct term
    assert last[0] == pytest.approx(float(hs.grad[-1].norm(dim=-1).mean()), rel=1e-10)


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_torch_nn_models_measure_like_their_scratch_twins(kind):
    scratch, twin = make(f"{kind}_scratch", layers=2), make(kind, layers=2)
    copy_into_twin(scratch, twin)
    X, Y = data()
    a, b = state_gradient_norms(scratch, X, Y), state_gradient_norms(twin, X, Y)
    np.testing.assert_allclose(a, b, rtol=1e-9)
    assert all(v > 0 for v in a[0] + a[1])
    sa, sb = spectral_summary(scratch), spectral_summary(twin)
    assert sa["diag_rho"] == pytest.approx(sb["diag_rho"], rel=1e-12)
    gates = {"rnn": [""], "gru": [".r", ".z", ".n"], "lstm": [".i", ".f", ".g", ".o"]}[kind]
    assert list(sa["diag_rho"]) == [f"l{k}{g}" for k in range(2) for g in gates]


def test_diagnostic_pass_leaves_training_state_alone():
    model = make("lstm_scratch", layers=2, dropout=0.5)
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    rng_before = torch.get_rng_state()
    state_gradient_norms(model, *data())
    assert model.training and torch.equal(torch.get_rng_state(), rng_before)
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters())


def test_eigenvalues_and_spectral_radius_of_known_matrices():
    model = make("gru_scratch", hidden=3)
    with torch.no_grad():
        W = model.layers[0].weight_hh  # rows r | z | n
        W.zero_()
        W[0:3].copy_(torch.diag(torch.tensor([0.5, -1.2, 0.3])))
        W[3:6].copy_(torch.tensor([[0.0, -2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.1]]))
    ev = eigenvalues(model)
    np.testing.assert_allclose(ev["l0.r"], [-1.2, 0.5, 0.3], atol=1e-12)
    np.testing.assert_allclose(np.abs(ev["l0.z"]), [2.0, 2.0, 0.1], atol=1e-12)
    assert sorted(ev["l0.z"][:2].imag.tolist()) == pytest.approx([-2.0, 2.0])
    summary = spectral_summary(model, leading=2)
    assert summary["diag_rho"] == pytest.approx({"l0.r": 1.2, "l0.z": 2.0, "l0.n": 0.0})
    assert summary["diag_eig"]["l0.r"] == [[-1.2, 0.0], [0.5, 0.0]]


def _pattern_windows(lengths, xis=None):
    g = torch.Generator().manual_seed(3)
    xis = xis or [None] * len(lengths)
    return [(torch.randint(0, V, (1, T), generator=g), torch.randint(0, V, (1, T), generator=g),
             xi) for T, xi in zip(lengths, xis)]


def _reachable(lengths, xis=None):
    """Which (loss s, step t) pairs BPTT connects: same window, t <= s, no cut in (t, s]."""
    n = sum(lengths)
    mask = np.zeros((n, n), dtype=bool)
    start = 0
    for w, T in enumerate(lengths):
        xi = None if xis is None or xis[w] is None else xis[w].tolist()
        for s in range(T):
            for t in range(s + 1):
                if xi is None or all(xi[k] != 0 for k in range(t + 1, s + 1)):
                    mask[start + s, start + t] = True
        start += T
    return mask


@pytest.mark.parametrize("kind", ["rnn_scratch", "gru_scratch", "lstm_scratch", "lstm"])
def test_truncation_pattern_regular_and_variable_windows(kind):
    model = make(kind)
    for lengths in ([4, 4, 4], [3, 6, 2]):
        pattern = truncation_pattern(model, _pattern_windows(lengths), carry_state=True)
        assert np.array_equal(pattern > 0, _reachable(lengths))


@pytest.mark.parametrize("kind", ["rnn_scratch", "lstm_scratch"])
@pytest.mark.parametrize("backward", ["manual", "autograd"])
def test_truncation_pattern_randomized_cuts_and_scales(kind, backward):
    model = make(kind, backward=backward)
    xis = [torch.tensor([2.0, 2.0, 0.0, 2.0, 2.0]), torch.tensor([0.0, 2.0, 2.0, 2.0, 0.0])]
    pattern = truncation_pattern(model, _pattern_windows([5, 5], xis), carry_state=True)
    assert np.array_equal(pattern > 0, _reachable([5, 5], xis))
    # where gradient does flow, it is scaled by 1/pi per step crossed: 2^(s-t) here
    plain = truncation_pattern(model, _pattern_windows([5, 5]), carry_state=True)
    assert pattern[4, 2] == pytest.approx(4 * plain[4, 2], rel=1e-10)
    assert pattern[8, 6] == pytest.approx(4 * plain[8, 6], rel=1e-10)


def test_pattern_windows_are_the_batches_and_xi_the_trainer_used():
    ids = np.random.default_rng(0).integers(0, V, 3000)
    batches = BatchIterator(ids, 4, 10, "sequential", seed=5,
                            variable_length=VariableLength(0.95, 5.0, 3))
    tr = Truncation("randomized", 10, seed=5, pi=0.5)
    windows = pattern_windows(batches, tr, epoch=2)
    expected = list(batches.epoch(2))[:3]
    assert len(windows) == 3
    for b, ((X, Y, xi), (EX, EY)) in enumerate(zip(windows, expected)):
        assert torch.equal(X, EX[:1]) and torch.equal(Y, EY[:1])
        assert torch.equal(xi, tr.xi(2, b, EX.shape[1]))


def test_diagnostic_batch_is_fixed_windows():
    X, Y = diagnostic_batch(np.arange(100), 3, 5)
    assert X.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    assert torch.equal(Y, X + 1)


# --- through the trainer ---------------------------------------------------------------------

def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# One xdist worker runs this module, so its trained fixture is made once (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("test_diagnostics")


@pytest.fixture(scope="module")
def diagnosed_runs(tmp_path_factory):
    """Three tiny runs with diagnostics: RNN regular, GRU randomized, LSTM variable_length."""
    root = tmp_path_factory.mktemp("diag")
    copy_of_time_machine(root)
    runs = {}
    for kind, strategy in [("rnn_scratch", "regular"), ("gru_scratch", "randomized"),
                           ("lstm_scratch", "variable_length")]:
        out = root / kind
        cfg = load_config(ROOT / "configs/tiny.yaml",
                          [f"data.data_dir={root / 'data'}", f"out_dir={out}",
                           f"model.kind={kind}", f"train.truncation={strategy}",
                           "train.truncation_pi=0.5", "train.variable_length_min=3",
                           "data.max_tokens=300", "train.epochs=3", "train.predict_every=0",
                           "train.diagnostics=true", "train.diagnostics_every=2"])
        train(cfg, quiet=True)
        runs[kind] = (cfg, out)
    return root, runs


def test_diagnostics_in_metrics_and_summary(diagnosed_runs):
    _, runs = diagnosed_runs
    for kind, (cfg, out) in runs.items():
        records = _metrics(out)
        assert ["diag_gnorm" in r for r in records] == [False, True, True]  # every 2 + last
        for r in records[1:]:
            assert len(r["diag_gnorm"]) == len(r["diag_gnorm_last"]) == cfg.data.num_steps
            assert all(v > 0 for v in r["diag_gnorm"])
            blocks = {"rnn_scratch": 1, "gru_scratch": 3, "lstm_scratch": 4}[kind]
            assert len(r["diag_rho"]) == len(r["diag_eig"]) == blocks
            assert 0 <= r["clipped_frac"] <= 1
        summary = json.loads((out / "diagnostics.json").read_text())
        assert summary["kind"] == kind and summary["truncation"] == cfg.train.truncation
        for name, ev in summary["eig_final"].items():  # all H eigenvalues, radius first
            assert len(ev) == cfg.model.hidden_size
            assert np.hypot(*ev[0]) == pytest.approx(records[-1]["diag_rho"][name], abs=1e-4)
        pattern = summary["pattern"]
        corpus_len = 300
        batches = BatchIterator(np.zeros(corpus_len, dtype=np.int64), cfg.data.batch_size,
                                cfg.data.num_steps, "sequential", seed=cfg.seed,
                                variable_length=VariableLength(0.95, 5.0, 3)
                                if cfg.train.truncation == "variable_length" else None)
        lengths = [X.shape[1] for X, _ in list(batches.epoch(2))[:3]]
        assert pattern["lengths"] == lengths and pattern["epoch"] == 3
        xis = None if pattern["xi"] is None else [torch.tensor(x) for x in pattern["xi"]]
        if cfg.train.truncation == "randomized":
            tr = Truncation.from_config(cfg)
            assert all(torch.equal(xis[b], tr.xi(2, b, lengths[b])) for b in range(3))
        norms = np.array(pattern["norms"])
        assert np.array_equal(norms > 0, _reachable(lengths, xis))
        # the D2L-style strips: cut at every batch boundary and at every xi_t = 0
        cuts = set(np.cumsum(lengths)[:-1].tolist())
        if xis is not None:
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            cuts |= {int(a) + t for a, xi in zip(starts, xis) for t in range(1, len(xi))
                     if xi[t] == 0}
        assert [a for a, _ in segments(norms)][1:] == sorted(cuts)
        assert (out / "diagnostics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diagnostics_do_not_change_training(diagnosed_runs, tmp_path):
    root, runs = diagnosed_runs
    cfg, out = runs["gru_scratch"]
    plain = load_config(out / "config.yaml", [f"out_dir={tmp_path}", "train.diagnostics=false"])
    train(plain, quiet=True)
    keys = ("train_loss", "grad_norm", "clipped_frac")
    assert [[r[k] for k in keys] for r in _metrics(tmp_path)] == \
        [[r[k] for k in keys] for r in _metrics(out)]


def test_side_by_side_figures(diagnosed_runs, tmp_path):
    _, runs = diagnosed_runs
    loaded = [load_run(out) for _, out in runs.values()]
    for plot in (plot_gradient_norms, plot_eigenvalues, plot_truncation_patterns):
        path = plot(loaded, tmp_path / f"{plot.__name__}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="no diagnostics.json"):
        load_run(tmp_path)


def test_diagnose_cli(diagnosed_runs, tmp_path, monkeypatch, capsys):
    root, runs = diagnosed_runs
    cfg, out = runs["lstm_scratch"]
    checkpoint = tmp_path / "last.pt"
    shutil.copy(out / "last.pt", checkpoint)  # written by the training run
    plot, record = diagnose_checkpoint(checkpoint)
    assert plot == tmp_path / "diagnose-last" / "diagnostics.png" and plot.is_file()
    summary = json.loads((plot.parent / "diagnostics.json").read_text())
    assert summary["gnorm"] == record["diag_gnorm"] and len(record["diag_rho"]) == 4
    # the same model as at the end of training: the same measurements as its last record
    trained = _metrics(out)[-1]
    assert record["diag_gnorm"] == pytest.approx(trained["diag_gnorm"], rel=1e-4)
    assert record["diag_rho"] == pytest.approx(trained["diag_rho"], rel=1e-9)
    assert summary["pattern"]["lengths"] == json.loads(
        (out / "diagnostics.json").read_text())["pattern"]["lengths"]

    import diagnose

    def main(*args):
        monkeypatch.setattr(sys, "argv", ["diagnose.py", *args])
        return diagnose.main()

    assert main("--checkpoint", str(checkpoint), "--out", str(tmp_path / "d")) == 0
    assert "spectral radius of W_hh: l0.i" in capsys.readouterr().out
    assert (tmp_path / "d" / "diagnostics.json").is_file()
    fig = tmp_path / "fig.png"
    assert main("--figure", "truncation", "--runs", *[str(o) for _, o in runs.values()],
                "--out", str(fig)) == 0 and fig.is_file()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    for args, fragment in [(["--checkpoint", str(tmp_path / "missing.pt")], "not found"),
                           (["--checkpoint", str(bad)], "is not an rnnlm checkpoint"),
                           (["--checkpoint", str(checkpoint), "--set", "model.hidden_size=3"],
                            "cannot change"),
                           (["--figure", "gradients", "--runs", str(tmp_path)], "--out"),
                           (["--figure", "gradients", "--runs", str(tmp_path / "nope"),
                             "--out", str(fig)], "not found")]:
        with pytest.raises(ConfigError, match=fragment):
            main(*args)
    # through the real entry point: one line on stderr, exit code 2
    done = subprocess.run([sys.executable, "diagnose.py", "--checkpoint", str(bad)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "is not an rnnlm checkpoint" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
