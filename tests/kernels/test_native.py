"""The C kernels (rnnlm/kernels/cells.c via native.py: per-step cell kernels and whole
window loops) against the TorchScript loops they replace, the models and trainer that use
them, and what happens without a compiler or without PyTorch's MKL."""

from __future__ import annotations

import platform

import pytest
import torch

from rnnlm.bptt import gated, rnn
from rnnlm.config import ConfigError, load_config
from rnnlm.config.checks import check_cell_kernel
from rnnlm.kernels import native
from rnnlm.models import build_model
from tests.conftest import spy_on_c_loops

needs_native = pytest.mark.skipif(not native.available(),
                                  reason=f"C kernels unavailable: "
                                         f"{native.unavailable_reason()}")


def weight_scale(H: int) -> float:
    """Recurrent weights whose products stay O(1) at every H (0.3 up to H = 16, then falling
    as 1/sqrt(H)): summed in another order, a product of size s differs by ~s * 1e-7."""
    return 0.3 * min(1.0, (16 / H) ** 0.5)


def assert_close(actual, expected, tol=2e-6):
    """Equal to float32 rounding, relative to the size of the values."""
    scale = max(1.0, float(expected.detach().abs().max()))
    assert float((actual - expected).detach().abs().max()) <= tol * scale


needs_windows = pytest.mark.skipif(not native.windows_available(),
                                   reason=f"C window loops unavailable: "
                                          f"{native.window_unavailable_reason()}")
# the loop in Python with a C call per step, and (where torch's MKL is found) the whole loop
# in C; vector tails and one lane among the shapes
WHOLE_WINDOW = [False, pytest.param(True, marks=needs_windows)]


@needs_native
@pytest.mark.parametrize("whole_window", WHOLE_WINDOW)
@pytest.mark.parametrize("B,H", [(3, 7), (1, 16), (5, 33), (16, 256)])
def test_lstm_loops_match_torchscript(B, H, whole_window):
    torch.manual_seed(B * H)
    T = 6
    xw, h0, c0 = torch.randn(T, B, 4 * H) * 2, torch.randn(B, H), torch.randn(B, H)
    W = torch.randn(4 * H, H) * weight_scale(H)
    expected = gated._lstm_forward_loop(xw, h0, c0, W)
    actual = native.lstm_forward_loop(xw, h0, c0, W, whole_window)
    for a, e in zip(actual, expected):
        assert_close(a, e)
    dhs, dc = torch.randn(T, B, H), torch.randn(B, H)
    expected = gated._lstm_backward_loop(dhs, dc.clone(), *expected, W, None)
    actual = native.lstm_backward_loop(dhs, dc.clone(), *actual, W, whole_window)
    for a, e in zip(actual, expected):
        assert_close(a, e, tol=1e-5)


@needs_native
@pytest.mark.parametrize("whole_window", WHOLE_WINDOW)
@pytest.mark.parametrize("B,H", [(3, 7), (1, 16), (4, 40), (16, 256)])
def test_gru_loops_match_torchscript(B, H, whole_window):
    torch.manual_seed(B + H)
    T = 6
    xw, h0 = torch.randn(T, B, 3 * H) * 2, torch.randn(B, H)
    W, b = torch.randn(3 * H, H) * weight_scale(H), torch.randn(3 * H)
    expected = gated._gru_forward_loop(xw, h0, W, b)
    actual = native.gru_forward_loop(xw, h0, W, b, whole_window)
    for a, e in zip(actual, expected):
        assert_close(a, e)
    dhs = torch.randn(T, B, H)
    expected = gated._gru_backward_window(dhs, *expected, W, None)
    for a, e in zip(native.gru_backward_loop(dhs, *actual, W, whole_window), expected):
        assert_close(a, e, tol=1e-5)


@needs_windows
@pytest.mark.parametrize("tanh", [True, False])
@pytest.mark.parametrize("B,H", [(3, 7), (1, 16), (4, 40), (16, 512)])
def test_rnn_loops_match_torchscript(B, H, tanh):
    torch.manual_seed(B * H + tanh)
    T = 6
    xw, h0, W = torch.randn(T, B, H) * 2, torch.randn(B, H), torch.randn(H, H) * weight_scale(H)
    expected = rnn._rnn_forward_loop(xw, h0, W, tanh)
    actual = native.rnn_forward_loop(xw, h0, W, tanh)
    assert_close(actual, expected)
    dhs = torch.randn(T, B, H)
    assert_close(native.rnn_backward_loop(actual, dhs, W, tanh),
                 rnn._rnn_backward_loop(expected, dhs, W, tanh, None), tol=1e-5)


def test_without_torchs_mkl_the_per_step_loops_run(monkeypatch):
    """No sgemm to call from C (another BLAS, another OS): the windows are refused with the
    reason, the gated models fall back to a C call per step and the RNN to TorchScript, and
    both still compute the same model."""
    monkeypatch.setattr(native, "BLAS_SYMBOLS", ("no_such_sgemm",))
    native.forget()
    try:
        assert not native.windows_available()
        assert "no MKL sgemm" in native.window_unavailable_reason()
        with pytest.raises(native.NativeUnavailable, match="no MKL sgemm"):
            native.rnn_forward_loop(torch.zeros(2, 1, 3), torch.zeros(1, 3),
                                          torch.zeros(3, 3), True)
        c = load_config(None, ["model.kind=rnn_scratch", "model.cell_kernel=c"])
        if native.available():
            with pytest.raises(ConfigError, match="c cannot be used here: no MKL sgemm"):
                check_cell_kernel(c, torch.device("cpu"))
        for kind in ("rnn_scratch", "gru_scratch", "lstm_scratch"):
            _assert_kernels_agree(kind)
    finally:
        native.forget()


@needs_native
def test_gate_functions_over_their_whole_range():
    """With W_hh = 0 the activations are sigmoid/tanh of xw: compared with torch's from
    -100 to 100, where the kernel's exp clamps its argument."""
    H = 4096 // 4
    x = torch.linspace(-100, 100, 4 * H).reshape(1, 1, 4 * H)
    zeros = torch.zeros(1, H)
    _, cbuf, acts, tanh_c = native.lstm_forward_loop(x, zeros, zeros,
                                                            torch.zeros(4 * H, H))
    gates = x[0, 0]
    expected = torch.cat([torch.sigmoid(gates[:2 * H]), torch.tanh(gates[2 * H: 3 * H]),
                          torch.sigmoid(gates[3 * H:])])
    assert float((acts[0, 0] - expected).abs().max()) < 3e-7
    assert float((tanh_c[0] - torch.tanh(cbuf[1])).abs().max()) < 3e-7
    assert torch.isfinite(acts).all()


def test_windows_are_found_where_torch_has_mkl():
    """On Linux x86-64 PyTorch ships MKL with these symbols: not finding them there is a bug
    (the window tests above would otherwise skip and leave the suite green)."""
    if not (platform.system() == "Linux" and platform.machine() == "x86_64"
            and torch.backends.mkl.is_available() and native.available()):
        pytest.skip("only PyTorch's Linux x86-64 builds are known to export MKL's sgemm")
    assert native.windows_available(), native.window_unavailable_reason()


@needs_native
@pytest.mark.parametrize("weight_dropout", [0.0, 0.3])
@pytest.mark.parametrize("kind", ["rnn_scratch", "lstm_scratch", "gru_scratch"])
def test_model_gradients_match_tensor_ops(kind, weight_dropout, monkeypatch):
    """The same float32 model, C kernels against tensor ops: loss, next state and every
    parameter's gradient agree to float32 rounding (two layers, carried state, with and
    without DropConnect on W_hh); the C side did run its loops, forward and backward, as
    whole windows where they are available."""
    cell = kind.split("_")[0]
    if cell == "rnn" and not native.windows_available():
        pytest.skip("the scratch RNN's C loop needs torch's MKL")
    calls = spy_on_c_loops(monkeypatch, [cell])
    _assert_kernels_agree(kind, weight_dropout)
    expected = [f"{cell}_backward_loop", f"{cell}_forward_loop"]
    if native.windows_available():
        expected.append("window")
    assert sorted(set(calls)) == expected


def _assert_kernels_agree(kind: str, weight_dropout: float = 0.0):
    models = {}
    for kernel in ("c", "torch"):
        cfg = load_config(None, [f"model.kind={kind}", "model.hidden_size=24",
                                 "model.num_layers=2", f"model.cell_kernel={kernel}",
                                 f"model.weight_dropout={weight_dropout}"])
        torch.manual_seed(0)
        models[kernel] = build_model(cfg.model, 11, cfg.train)
    torch.manual_seed(1)
    X = torch.randint(0, 11, (5, 9))
    state = tuple(torch.randn_like(s) * 0.5 for s in models["c"].begin_state(5))
    results = {}
    for kernel, model in models.items():
        torch.manual_seed(2)  # the same DropConnect masks on both sides
        logits, new_state = model(X, state)
        logits.square().mean().backward()
        results[kernel] = (logits, new_state, [p.grad for p in model.parameters()])
    (lc, sc, gc), (lt, st, gt) = results["c"], results["torch"]
    assert_close(lc, lt)
    for a, e in zip(sc, st):
        assert_close(a, e)
    for a, e in zip(gc, gt):
        assert_close(a, e, tol=1e-5)


def test_usable_for_follows_the_setting():
    f32, f64 = torch.zeros(1), torch.zeros(1, dtype=torch.float64)
    assert not native.usable_for("torch", f32, None)
    for kernel in ("auto", "c"):  # "c" is enforced before training, not per window
        assert not native.usable_for(kernel, f64, None)  # float64 runs tensor ops
        assert not native.usable_for(kernel, f32, torch.ones(3))  # randomized trunc.
        assert native.usable_for(kernel, f32, None) == native.available()


@needs_native
def test_a_c_checkpoint_evaluates_in_float64():
    """A model built with cell_kernel=c still runs where the kernels cannot (float64 here,
    a GPU when a CPU-trained checkpoint is sampled there): tensor ops, the same result."""
    cfg = load_config(None, ["model.kind=lstm_scratch", "model.hidden_size=8",
                             "model.cell_kernel=c"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 5, cfg.train).double()
    twin = build_model(cfg.model, 5, cfg.train).double()
    twin.load_state_dict(model.state_dict())
    for layer in twin.layers:
        layer.cell_kernel = "torch"
    X = torch.randint(0, 5, (2, 4))
    assert torch.equal(model(X, model.begin_state(2))[0], twin(X, twin.begin_state(2))[0])


@pytest.fixture
def no_compiler(monkeypatch):
    monkeypatch.setattr(native, "find_compiler", lambda: None)
    native.forget()
    yield
    native.forget()


def test_without_a_compiler_auto_falls_back_and_c_is_refused(no_compiler, capsys):
    assert not native.available()
    assert "no C compiler" in native.unavailable_reason()
    assert not native.usable_for("auto", torch.zeros(1), None)
    cfg = load_config(None, ["model.kind=lstm_scratch", "model.cell_kernel=c"])
    with pytest.raises(ConfigError, match="model.cell_kernel: c cannot be used here: no C"):
        check_cell_kernel(cfg, torch.device("cpu"))
    auto = load_config(None, ["model.kind=lstm_scratch"])
    check_cell_kernel(auto, torch.device("cpu"))
    assert "C cell kernels unavailable" in capsys.readouterr().err
    autograd = load_config(None, ["model.kind=lstm_scratch", "model.backward=autograd"])
    check_cell_kernel(autograd, torch.device("cpu"))  # would not use them: nothing to say
    assert capsys.readouterr().err == ""
    model = build_model(auto.model, 7, auto.train)  # and the model still runs
    logits, _ = model(torch.randint(0, 7, (2, 3)), model.begin_state(2))
    assert logits.shape == (3, 2, 7)


def test_a_failing_build_is_reported(monkeypatch, tmp_path):
    bad = tmp_path / "cells.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCE", bad)
    native.forget()
    try:
        if native.find_compiler() is None:
            pytest.skip("no C compiler here")
        assert native.unavailable_reason().startswith("building cells.c failed")
        assert not native.windows_available()
        assert not list(tmp_path.glob("*.so"))
    finally:
        native.forget()


def test_c_on_a_gpu_is_refused():
    cfg = load_config(None, ["model.kind=gru_scratch", "model.cell_kernel=c"])
    with pytest.raises(ConfigError, match="runs on the CPU"):
        check_cell_kernel(cfg, torch.device("cuda"))


@pytest.mark.parametrize("overrides,match", [
    (["model.kind=lstm", "model.cell_kernel=c", "train.precision=bf16"],
     "hand-written eager backward"),
    (["model.kind=rnn", "model.cell_kernel=c", "train.compile=true"],
     "hand-written eager backward"),
    (["model.kind=lstm_scratch", "model.cell_kernel=c", "model.backward=autograd"],
     "hand-written eager backward"),
    (["model.kind=gru_scratch", "model.cell_kernel=c", "train.truncation=randomized"],
     "hand-written eager backward"),
    (["model.kind=gru_scratch", "model.cell_kernel=c", "device=cuda"], "runs on the CPU"),
    (["model.kind=gru_scratch", "model.cell_kernel=fast"], "model.cell_kernel"),
])
def test_config_refuses_what_the_c_kernel_cannot_do(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


@pytest.mark.parametrize("kind", ["rnn_scratch", "gru_scratch", "lstm_scratch", "rnn", "gru"])
def test_bf16_keeps_the_c_windows(kind):
    """Under bf16 the hand-written windows keep their C loops (bf16 products), so
    model.cell_kernel: c stays possible; nn.LSTM alone runs its fused layer (above)."""
    load_config(None, [f"model.kind={kind}", "model.cell_kernel=c", "train.precision=bf16"])


@needs_windows
def test_the_roofline_products_are_the_loops_products():
    """bench.py's roofline times the recurrent products as the window loops compute them:
    `steps` accumulations of h W_hh^T (packed) and dgates W_hh."""
    torch.manual_seed(0)
    B, H, G, steps = 3, 8, 32, 4
    h, W, dgates = torch.randn(B, H), torch.randn(G, H), torch.randn(B, G)
    out_f, out_b = torch.zeros(B, G), torch.zeros(B, H)
    native.recurrent_products(h, W, out_f, dgates, out_b, steps)
    assert_close(out_f, steps * (h @ W.t()), tol=1e-5)
    assert_close(out_b, steps * (dgates @ W), tol=1e-5)
