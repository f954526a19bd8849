"""The torch.nn kinds (rnn, gru, lstm) on the C window loops: model.cell_kernel auto/c runs
their layers one at a time through the scratch layers' hand-written windows on the layer's
own parameters, and that computes what PyTorch's layer computes (model.cell_kernel=torch):
outputs, final states and every gradient, to float32 rounding; the C loops did run; the layer
runs where they cannot (autocast, torch.compile, float64, no MKL) and for one-step windows
(generation); "c" is refused in one line where the run could not use them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from rnnlm.config import ConfigError, ModelConfig, load_config
from rnnlm.config.checks import check_cell_kernel
from rnnlm.kernels import native
from rnnlm.models import build_model
from rnnlm.models.scratch import LayerWeights
from rnnlm.models.torch_nn import TorchLSTM
from tests.conftest import ROOT, spy_on_c_loops

needs_windows = pytest.mark.skipif(not native.windows_available(),
                                   reason=f"C window loops unavailable: "
                                          f"{native.window_unavailable_reason()}")

V, H, B = 11, 24, 5
KINDS = ["rnn", "gru", "lstm"]


def make(kind: str, cell_kernel: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(kind=kind, hidden_size=H, cell_kernel=cell_kernel, **kw), V)


def pair(kind: str, **kw):
    """The same model twice, on the C windows and on PyTorch's layer, with equal weights."""
    c, layer = make(kind, "c", **kw), make(kind, "torch", **kw)
    layer.load_state_dict(c.state_dict())
    return c, layer


def run(model, X, init, seed: int = 2):
    """Logits, final state, and the gradients of every parameter and of the initial state
    for a loss that reaches both the outputs and the final state."""
    state = tuple(s.clone().requires_grad_(True) for s in init)
    torch.manual_seed(seed)  # the same dropout and DropConnect draws on both sides
    logits, final = model(X, state)
    loss = logits.square().mean() + sum((f * torch.linspace(-1, 1, H)).sum() for f in final)
    loss.backward()
    return logits, final, [p.grad for p in model.parameters()], [s.grad for s in state]


def assert_close(actual, expected, tol):
    """Equal to float32 rounding, relative to the size of the values."""
    scale = max(1.0, float(expected.detach().abs().max()))
    err = float((actual - expected).detach().abs().max())
    assert err <= tol * scale, f"{err:.3g} > {tol:.1g} x {scale:.3g}"


def assert_same_results(a, b, grad_tol=1e-5):
    (la, fa, ga, sa), (lb, fb, gb, sb) = a, b
    assert_close(la, lb, 2e-6)
    assert len(fa) == len(fb)
    for x, y in zip(fa, fb):
        assert x.shape == y.shape
        assert_close(x, y, 2e-6)
    assert len(ga) == len(gb)
    for x, y in zip([*ga, *sa], [*gb, *sb]):
        assert x is not None and y is not None
        assert_close(x, y, grad_tol)


@pytest.fixture
def c_calls(monkeypatch):
    """The names of the C entry points called (each window loop and the BLAS-backed library
    the whole-window loops need)."""
    return spy_on_c_loops(monkeypatch, KINDS)


def layer_calls(model) -> list:
    """Records every call of the model's nn.RNNBase (its forward: the fused layer)."""
    calls = []
    model.rnn.register_forward_hook(lambda *_: calls.append("layer"))
    return calls


def inputs(model, T: int):
    torch.manual_seed(1)
    X = torch.randint(0, V, (B, T))
    init = tuple(torch.randn_like(s) * 0.5 for s in model.begin_state(B))
    return X, init


@needs_windows
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("emb", [None, 6], ids=["one-hot", "embedding"])
@pytest.mark.parametrize("T", [1, 7, 35])
def test_c_windows_equal_the_layer(kind, layers, emb, T, c_calls):
    c, layer = pair(kind, num_layers=layers, embedding_dim=emb)
    c.c_windows_from_steps = 1  # one-step windows too (by default they run the layer)
    seen_c, seen_layer = layer_calls(c), layer_calls(layer)
    X, init = inputs(c, T)
    c_result = run(c, X, init)
    # the C model ran its windows in C, forward and backward, and never the layer; the
    # torch model ran its layer (once: the layers stacked in one call) and no C loop
    assert sorted(set(c_calls)) == [f"{kind}_backward_loop", f"{kind}_forward_loop", "window"]
    assert c_calls.count(f"{kind}_forward_loop") == layers
    c_calls.clear()
    layer_result = run(layer, X, init)
    assert seen_c == [] and seen_layer == ["layer"] and c_calls == []
    assert_same_results(c_result, layer_result)


@needs_windows
@pytest.mark.parametrize("kind", KINDS)
def test_the_equality_check_can_fail(kind, monkeypatch):
    """Not vacuous: the C path on weights with two gate blocks (or, for the plain RNN, two
    hidden units) of W_ih swapped no longer equals the layer."""
    c, layer = pair(kind)
    original = type(c).manual_window

    def swapped(w: LayerWeights, *args):
        if kind == "rnn":
            rows = torch.arange(H).roll(1)
        else:  # the first two gates: r and z, or i and f
            rows = torch.cat([torch.arange(H, 2 * H), torch.arange(H),
                              torch.arange(2 * H, w.weight_ih.shape[0])])
        return original(w._replace(weight_ih=w.weight_ih[rows]), *args)

    monkeypatch.setattr(type(c), "manual_window", staticmethod(swapped))
    X, init = inputs(c, 7)
    with pytest.raises(AssertionError):
        assert_same_results(run(c, X, init), run(layer, X, init))


@needs_windows
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("masks", ["per_step", "locked"])
def test_dropout_and_dropconnect_draw_what_the_layer_draws(kind, masks, c_calls):
    """Under one seed both paths draw the same DropConnect masks on W_hh (one per window,
    the gradient flowing back to the original weight), the same masks between the layers
    (per_step: the layer's inner dropout; locked: LockedDropout) and on the input and output,
    so they still compute the same numbers; the masks did act."""
    options = dict(num_layers=2, embedding_dim=6, dropout=0.4, weight_dropout=0.5,
                   input_dropout=0.2, output_dropout=0.3, dropout_masks=masks)
    c, layer = pair(kind, **options)
    X, init = inputs(c, 9)
    dropped = run(c, X, init)
    assert_same_results(dropped, run(layer, X, init))
    assert f"{kind}_forward_loop" in c_calls
    # the masks changed the result, and DropConnect zeroed the gradient of dropped weights
    plain = make(kind, "c", **{**options, "dropout": 0.0, "weight_dropout": 0.0,
                               "input_dropout": 0.0, "output_dropout": 0.0})
    plain.load_state_dict(c.state_dict())
    assert not torch.allclose(run(plain, X, init)[0], dropped[0])
    grad_hh = c.rnn.weight_hh_l0.grad
    assert (grad_hh == 0).float().mean() > 0.3


@needs_windows
@pytest.mark.parametrize("kind", KINDS)
def test_evaluation_without_grad_equals_the_layer(kind, c_calls):
    c, layer = pair(kind, num_layers=2, dropout=0.5)
    X, init = inputs(c, 35)
    outs = []
    for model in (c, layer):
        model.eval()
        with torch.no_grad():
            logits, final = model(X, init)
        outs.append((logits, final))
    assert_close(outs[0][0], outs[1][0], 2e-6)
    for a, b in zip(outs[0][1], outs[1][1]):
        assert_close(a, b, 2e-6)
    assert f"{kind}_forward_loop" in c_calls and f"{kind}_backward_loop" not in c_calls


def test_the_state_dict_is_the_layers_own():
    """Checkpoints do not depend on the kernel: the same keys and shapes either way (the
    layer's own), loadable across."""
    c, layer = make("lstm", "c", num_layers=2), make("lstm", "torch", num_layers=2)
    assert {k: v.shape for k, v in c.state_dict().items()} == \
        {k: v.shape for k, v in layer.state_dict().items()}
    assert "rnn.weight_hh_l1" in c.state_dict()
    layer.load_state_dict(c.state_dict())


@needs_windows
@pytest.mark.parametrize("kind", KINDS)
def test_cell_kernel_torch_and_auto(kind, c_calls):
    """model.cell_kernel reaches the model: torch calls the layer (today's behaviour), auto
    runs the C windows where they apply."""
    torch_model, auto = make(kind, "torch"), make(kind, "auto")
    assert torch_model.cell_kernel == "torch" and auto.cell_kernel == "auto"
    assert not torch_model.uses_c_windows() and auto.uses_c_windows()
    seen = layer_calls(torch_model)
    X, init = inputs(auto, 4)
    run(torch_model, X, init)
    assert seen == ["layer"] and c_calls == []
    seen = layer_calls(auto)
    run(auto, X, init)
    assert seen == [] and f"{kind}_forward_loop" in c_calls


@needs_windows
@pytest.mark.parametrize("kind", KINDS)
def test_one_step_windows_run_the_layer(kind, c_calls):
    """Generation feeds one token per call: those windows run the layer, which is faster
    there; the prefix, a longer window, runs in C. Both decode what the model computes."""
    model = make(kind, "c")
    seen = layer_calls(model)
    decoder = model.decoder()
    prefix = decoder.feed(torch.tensor([1, 4, 2, 7]))
    assert seen == [] and f"{kind}_forward_loop" in c_calls
    c_calls.clear()
    step = decoder.step(3)
    assert seen == ["layer"] and c_calls == []
    with torch.no_grad():
        logits, _ = model(torch.tensor([[1, 4, 2, 7, 3]]), model.begin_state(1))
    assert_close(prefix, logits[3], 2e-6)
    assert_close(step, logits[4], 2e-6)


@needs_windows
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_picks_windows_or_layer_as_the_kind_declares(kind, c_calls,
                                                                   monkeypatch):
    """Under bf16 autocast nn.RNN and nn.GRU keep the C windows with bf16 products
    (supports.c_windows_bf16); nn.LSTM runs its layer, which computes in bf16 itself; and
    where MKL's bf16 GEMM is missing every kind runs its layer (the C loops would otherwise
    silently compute in float32). Outside autocast the C windows run again."""
    model = make(kind, "c", num_layers=2)
    seen = layer_calls(model)
    X, init = inputs(model, 5)
    windows = model.supports.c_windows_bf16 and native._BF16_PRODUCTS
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.uses_c_windows() == windows
        logits, _ = model(X, init)
    assert (seen == []) == windows
    assert (f"{kind}_forward_loop" in c_calls) == windows
    seen.clear()
    c_calls.clear()
    monkeypatch.setattr(native, "_BF16_PRODUCTS", False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not model.uses_c_windows()
        logits, _ = model(X, init)
    assert logits.dtype == torch.bfloat16
    assert seen == ["layer"] and c_calls == []
    assert model.uses_c_windows()
    model(X, init)
    assert seen == ["layer"] and f"{kind}_forward_loop" in c_calls


@needs_windows
def test_the_layer_runs_where_the_c_windows_cannot(monkeypatch):
    """torch.compile's tracing, float64, and a PyTorch without MKL's sgemm (where the scratch
    GRU/LSTM would still use their per-step C kernels, a torch.nn layer gains nothing from
    them): auto calls the layer there."""
    model = make("gru", "auto")
    seen = layer_calls(model)
    X, init = inputs(model, 3)
    with monkeypatch.context() as patch:
        patch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not model.uses_c_windows()
    assert not make("gru", "auto").double().uses_c_windows()
    assert model.uses_c_windows()
    with monkeypatch.context() as patch:
        patch.setattr(native, "BLAS_SYMBOLS", ("no_such_sgemm",))
        native.forget()
        try:
            assert native.available() and not native.windows_available()
            assert not model.uses_c_windows()
            model(X, init)
            assert seen == ["layer"]
            # and a training run asking for "c" is refused, while for the scratch GRU the
            # per-step kernels still count
            cfg = load_config(None, ["model.kind=gru", "model.cell_kernel=c"])
            with pytest.raises(ConfigError, match="model.cell_kernel: c cannot be used here"):
                check_cell_kernel(cfg, torch.device("cpu"))
            check_cell_kernel(load_config(None, ["model.kind=gru_scratch",
                                                 "model.cell_kernel=c"]), torch.device("cpu"))
        finally:
            native.forget()
    assert model.uses_c_windows()


@pytest.mark.parametrize("option, blocker", [
    ("train.precision=bf16", "train.precision=bf16"),
    ("train.compile=true", "train.compile"),
])
def test_c_is_refused_where_it_cannot_run(option, blocker):
    with pytest.raises(ConfigError, match=f"model.cell_kernel: c .* with {blocker} use "
                                          f"model.cell_kernel=auto") as refused:
        load_config(None, ["model.kind=lstm", "model.cell_kernel=c", option])
    assert "\n" not in str(refused.value)
    load_config(None, ["model.kind=lstm", "model.cell_kernel=auto", option])  # auto: the layer
    load_config(None, ["model.kind=lstm", "model.cell_kernel=torch", option])
    with pytest.raises(ConfigError, match="runs on the CPU"):
        check_cell_kernel(load_config(None, ["model.kind=rnn", "model.cell_kernel=c"]),
                          torch.device("cuda"))


def test_the_command_refuses_c_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rnnlm", "train", "--config",
                           "configs/lstm.yaml", "--set", "model.cell_kernel=c", "--set",
                           "train.precision=bf16", "--set", f"out_dir={tmp_path / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.cell_kernel: c" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_model_backward_stays_auto_for_the_torch_nn_kinds():
    """Their backward follows model.cell_kernel (the windows' hand-written one, or the
    layer's); model.backward is for the kinds that choose it step by step."""
    with pytest.raises(ConfigError, match="lstm runs the hand-written backward only on its C "
                                          "windows, which model.cell_kernel chooses"):
        load_config(None, ["model.kind=lstm", "model.backward=manual"])
    assert TorchLSTM.supports.c_windows and not TorchLSTM.supports.manual_backward
