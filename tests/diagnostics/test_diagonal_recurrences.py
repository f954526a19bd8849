"""The eigenvalue picture of the diagonal recurrences (LRU, minGRU, minLSTM): the coefficients
the model reports are the Jacobians dh_t/dh_(t-1) of its own steps, the recorded lambdas are
the model's eigenvalues, ||dL/dh_t|| covers the LRU's whole complex state, the held-out
windows come from the validation split, and the figures draw every kind, through the trainer,
a measured checkpoint and diagnose.py."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rnnlm.config import ModelConfig, config_from_dict, load_config
from rnnlm.diagnostics.gradients import (
    A_BINS,
    diagonal_summary,
    eigenvalues,
    epoch_record,
    state_gradient_norms,
)
from rnnlm.diagnostics.plots import (
    lambda_history,
    load_run,
    plot_eigenvalues,
    plot_gradient_norms,
    plot_lambdas,
)
from rnnlm.diagnostics.report import (
    diagnose_checkpoint,
    heldout_windows,
    load_checkpoint_model,
)
from rnnlm.models import build_model
from rnnlm.training.run import train
from tests.conftest import ROOT, copy_of_time_machine

DIAGONAL = ["lru", "mingru", "minlstm"]
DENSE = ["rnn_scratch", "gru_scratch", "lstm_scratch", "rnn", "lstm"]
V, H = 9, 5
PNG = b"\x89PNG\r\n\x1a\n"


def make(kind: str, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(kind=kind, hidden_size=H, num_layers=layers,
                      embedding_dim=4 if kind in DIAGONAL else None)
    return build_model(cfg, V).double().eval()


def tokens(B: int = 3, T: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def random_state(model, B: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s.shape, generator=g, dtype=s.dtype)
                 for s in model.begin_state(B))


@pytest.mark.parametrize("kind", DIAGONAL)
def test_coefficients_are_the_jacobians_of_the_steps(kind):
    """a_t reported by recurrence_coefficients is dh_t/dh_(t-1) of the model's own step, layer
    by layer (diagonal; for the LRU the complex lambda acting on (Re h, Im h))."""
    model = make(kind)
    X, _ = tokens(B=2, T=4)
    state = random_state(model, 2)
    coefficients = model.recurrence_coefficients(X, state)
    assert len(coefficients) == model.num_layers
    assert all(a.shape == (4, 2, H) for a in coefficients)
    weights = torch.randn(2, H, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for t in range(X.shape[1]):
        previous = tuple(s.detach().requires_grad_(True) for s in state)
        _, state = model(X[:, t: t + 1], previous)
        for k, a in enumerate(coefficients):
            a = a[t].to(torch.complex128)  # (B, H)
            # d(sum w * part j of h_t) / d(part i of h_(t-1)) is w * the Jacobian's diagonal
            # exactly when the Jacobian is diagonal (random w: any off-diagonal entry shows)
            for j, out in enumerate(state):
                for i, inp in enumerate(previous):
                    (grad,) = torch.autograd.grad((out[k] * weights).sum(), inp,
                                                  retain_graph=True)
                    expected = weights * [[a.real, -a.imag], [a.imag, a.real]][j][i]
                    torch.testing.assert_close(grad[k], expected, atol=1e-12, rtol=1e-12)
        state = tuple(s.detach() for s in state)


@pytest.mark.parametrize("kind", DIAGONAL + DENSE)
def test_recorded_lambdas_equal_the_models_eigenvalues(kind):
    model = make(kind)
    X, Y = tokens()
    record = epoch_record(model, X, Y)
    if kind in DENSE:
        assert model.recurrence_coefficients(X, model.begin_state(3)) is None
        assert diagonal_summary(model, X) == {}
        assert "diag_lambda" not in record and "diag_a" not in record
        return
    for k in range(model.num_layers):
        name = f"l{k}"
        recorded = np.array(record["diag_lambda"][name])
        exact = model.eigenvalues(k)[""].numpy()
        assert recorded.shape == (H, 2)
        np.testing.assert_allclose(recorded[:, 0] + 1j * recorded[:, 1],
                                   eigenvalues(model)[name], atol=1e-6)
        np.testing.assert_allclose(np.sort_complex(recorded[:, 0] + 1j * recorded[:, 1]),
                                   np.sort_complex(exact), atol=1e-6)
        a = model.recurrence_coefficients(X, model.begin_state(3))[k].to(torch.complex128)
        measured = record["diag_a"][name]
        mean = np.array(measured["mean"])
        np.testing.assert_allclose(mean[:, 0] + 1j * mean[:, 1], a.mean(dim=(0, 1)).numpy(),
                                   atol=1e-6)
        assert len(measured["hist"]) == A_BINS
        assert sum(measured["hist"]) == pytest.approx(1, abs=1e-3)  # 4 significant digits
        assert measured["max"] == pytest.approx(float(a.abs().max())) and measured["max"] < 1
        # the LRU's a_t is lambda at every step; minGRU's and minLSTM's move with the input
        assert measured["input_dependent"] == (kind != "lru")
        if kind == "lru":
            np.testing.assert_allclose(mean[:, 0] + 1j * mean[:, 1], exact, atol=1e-6)


@pytest.mark.parametrize("kind", ["lru", "mingru", "lstm_scratch", "lstm"])
def test_state_gradient_norm_covers_the_whole_hidden_state(kind):
    """||dL/dh_t|| is the norm over the tensors model.hidden names: both Re h and Im h for
    the LRU (strictly more than Re h alone), h but not the cell c for the LSTM."""
    model = make(kind)
    X, Y = tokens()
    total, last = state_gradient_norms(model, X, Y)
    state, states, losses = model.begin_state(3), [], []
    with torch.enable_grad():
        for t in range(X.shape[1]):
            _, state = model(X[:, t: t + 1], state)
            states.append(state)
            losses.append(F.cross_entropy(model.step_logits(X[:, t], state), Y[:, t]))
        parts = {"lru": 2, "mingru": 1}.get(kind, 1)
        assert len(model.hidden(states[0])) == parts
        flat = [s[i] for s in states for i in range(parts)]
        grads = torch.autograd.grad(torch.stack(losses).mean(), flat)
    by_step = [grads[t * parts: (t + 1) * parts] for t in range(X.shape[1])]
    expected = [float(sum(g[-1].square().sum(-1) for g in gs).sqrt().mean())
                for gs in reversed(by_step)]
    np.testing.assert_allclose(total, expected, rtol=1e-10)
    assert all(v > 0 for v in total + last)
    if kind == "lru":
        real_only = [float(gs[0][-1].norm(dim=-1).mean()) for gs in reversed(by_step)]
        assert all(whole > re for whole, re in zip(total, real_only))


@pytest.mark.parametrize("kind", DIAGONAL)
def test_the_last_steps_gradient_decays_by_the_coefficients_exactly(kind):
    """The dashed curve of the gradient figure, predicted channel by channel: the top layer's
    h_t reaches the last step's loss only through its own diagonal recurrence, so
    dl_T/dh_(T-d) = conj(a_(T-d+1) * ... * a_T) * dl_T/dh_T, |lambda|^d for the LRU."""
    model = make(kind)
    X, Y = tokens(B=3, T=9)
    _, last = state_gradient_norms(model, X, Y)
    with torch.enable_grad():
        state = model.begin_state(3)
        for t in range(X.shape[1]):
            _, state = model(X[:, t: t + 1], state)
        parts = model.hidden(state)
        loss = F.cross_entropy(model.step_logits(X[:, -1], state), Y[:, -1])
        grads = torch.autograd.grad(loss, parts)
    direct = sum(g[-1].square() for g in grads).sqrt()  # |dl_T/dh_T| per lane and channel
    a = model.recurrence_coefficients(X, model.begin_state(3))[-1]  # the top layer's a_t
    for d in range(X.shape[1]):
        reach = a[X.shape[1] - d:].prod(dim=0).abs() if d else torch.ones_like(direct)
        predicted = float((reach * direct).norm(dim=-1).mean())
        assert last[d] == pytest.approx(predicted, rel=1e-9)
    if kind == "lru":
        lam = model.eigenvalues(1)[""].abs()
        assert torch.allclose(a.abs().to(torch.float64), lam.expand_as(a), rtol=1e-12)


def test_heldout_windows_come_from_the_validation_split():
    ids = np.arange(1000)
    cfg = config_from_dict({}, ["data.split=[0.8, 0.1, 0.1]", "data.num_steps=10"])
    X = heldout_windows(ids, cfg, count=4)
    assert X.shape == (4, 10) and X[0, 0] == 800 and X[-1, -1] == 839
    X = heldout_windows(ids, cfg)  # 100 validation tokens hold 9 windows and a target
    assert X.shape == (9, 10)
    no_split = config_from_dict({}, ["data.num_steps=10"])
    assert heldout_windows(ids, no_split, count=2).tolist() == [list(range(10)),
                                                                list(range(10, 20))]


# --- through the trainer ---------------------------------------------------------------------

pytestmark = pytest.mark.xdist_group("test_diagonal_recurrences")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs with diagnostics (every epoch) of a diagonal and a dense kind each."""
    root = tmp_path_factory.mktemp("lambdas")
    copy_of_time_machine(root)
    out = {}
    for kind in ["lru", "mingru", "minlstm", "rnn_scratch", "lstm"]:
        extra = ["model.embedding_dim=8", "train.optimizer=adam", "train.lr=0.01"] \
            if kind in DIAGONAL else []
        cfg = load_config(ROOT / "configs/tiny.yaml",
                          [f"data.data_dir={root / 'data'}", f"out_dir={root / kind}",
                           f"model.kind={kind}", "model.hidden_size=8", "model.num_layers=2",
                           "data.max_tokens=1000", "data.split=[0.8, 0.1, 0.1]",
                           "train.epochs=2", "train.predict_every=0", "train.threads=1",
                           "train.diagnostics=true", *extra])
        train(cfg, quiet=True)
        out[kind] = (cfg, root / kind)
    return root, out


def _records(out):
    """The epochs' records (a split run's metrics.jsonl ends with its test score)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "epoch" in r]


def test_training_records_the_lambdas_of_every_epoch(runs):
    _, out = runs
    for kind, (cfg, folder) in out.items():
        records = _records(folder)
        assert len(records) == 2 and all("diag_gnorm" in r for r in records)
        summary = json.loads((folder / "diagnostics.json").read_text())
        if kind not in DIAGONAL:
            assert all("diag_lambda" not in r for r in records) and "coef_init" not in summary
            continue
        # the last record is the trained model's exact diagonal, as its checkpoint holds it
        model = load_checkpoint_model(folder / "last.pt")[0]
        for k in range(cfg.model.num_layers):
            recorded = np.array(records[-1]["diag_lambda"][f"l{k}"])
            np.testing.assert_allclose(np.sort_complex(recorded[:, 0] + 1j * recorded[:, 1]),
                                       np.sort_complex(model.eigenvalues(k)[""].numpy()),
                                       atol=1e-6)
        assert set(summary["coef_init"]) == {"l0", "l1"}
        history, what = lambda_history(load_run(folder))
        assert [epoch for epoch, _ in history] == [0, 1, 2]
        assert all(set(panels) == {"l0", "l1"} for _, panels in history)
        assert all(len(z) == cfg.model.hidden_size for _, p in history for z in p.values())
        assert ("mean a_t" in what) == (kind != "lru")
        if kind == "lru":  # epoch 0: the ring initialisation, the eigenvalues before training
            init = np.array(summary["eig_init"]["l0"])
            np.testing.assert_allclose(history[0][1]["l0"], init[:, 0] + 1j * init[:, 1])


def test_figures_draw_every_kind(runs, tmp_path):
    _, out = runs
    loaded = [load_run(folder) for _, folder in out.values()]
    for plot in (plot_lambdas, plot_gradient_norms, plot_eigenvalues):
        path = plot(loaded, tmp_path / f"{plot.__name__}.png")
        assert path.read_bytes()[:8] == PNG
    for run in loaded:  # each on its own too, and the dashboard of the run
        assert plot_lambdas([run], tmp_path / f"{run.name}.png").read_bytes()[:8] == PNG
    for _, folder in out.values():
        assert (folder / "diagnostics.png").read_bytes()[:8] == PNG


def test_a_measured_checkpoint_draws_its_lambdas(runs, tmp_path, monkeypatch, capsys):
    _, out = runs
    _, folder = out["mingru"]
    checkpoint = tmp_path / "run" / "last.pt"
    checkpoint.parent.mkdir()
    shutil.copy(folder / "last.pt", checkpoint)
    plot, record = diagnose_checkpoint(checkpoint)
    trained = _records(folder)[-1]
    assert record["diag_lambda"] == trained["diag_lambda"]
    assert record["diag_a"]["l1"]["hist"] == pytest.approx(trained["diag_a"]["l1"]["hist"],
                                                           abs=1e-6)
    history, _ = lambda_history(load_run(checkpoint.parent))
    assert [epoch for epoch, _ in history] == [2]

    import diagnose

    figure = tmp_path / "lambdas.png"
    monkeypatch.setattr(sys, "argv", ["diagnose.py", "--figure", "lambdas", "--runs",
                                      str(out["lru"][1]), str(checkpoint.parent),
                                      "--out", str(figure)])
    assert diagnose.main() == 0 and figure.read_bytes()[:8] == PNG
    monkeypatch.setattr(sys, "argv", ["diagnose.py", "--checkpoint", str(checkpoint),
                                      "--out", str(tmp_path / "d")])
    assert diagnose.main() == 0
    assert "largest |a_t| on held-out text: l0" in capsys.readouterr().out
