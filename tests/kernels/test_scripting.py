"""The TorchScript-compiled recurrent loops compute exactly what their Python source does."""

import pytest
import torch

from rnnlm.bptt import gated, rnn
from rnnlm.kernels.scripting import scripted


def inputs(name, xi, seed=0):
    """Arguments of each loop, float32 (the training dtype), shapes as in a window."""
    g = torch.Generator().manual_seed(seed)
    T, B, H = 7, 3, 5

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    xi = torch.tensor([0.0, 2.0] * T)[:T] if xi else None
    if name == "rnn_forward":
        return (rand(T, B, H), rand(B, H), rand(H, H, scale=0.5), True)
    if name == "rnn_backward":
        buf = rand(T + 1, B, H).tanh()
        return (buf, rand(T, B, H), rand(H, H, scale=0.5), True, xi)
    if name == "lstm_forward":
        return (rand(T, B, 4 * H), rand(B, H), rand(B, H), rand(4 * H, H, scale=0.5))
    if name == "lstm_backward":
        hbuf, cbuf, acts, tanh_c = gated._lstm_forward_loop.python(
            *inputs("lstm_forward", False, seed + 1))
        return (rand(T, B, H), rand(B, H), hbuf, cbuf, acts, tanh_c,
                rand(4 * H, H, scale=0.5), xi)
    if name == "gru_forward":
        return (rand(T, B, 3 * H), rand(B, H), rand(3 * H, H, scale=0.5), rand(3 * H))
    if name == "gru_backward":
        return (rand(T, B, H), rand(T, B, H).sigmoid(), rand(T, B, 3, H),
                rand(3 * H, H, scale=0.5), xi)
    raise ValueError(name)


LOOPS = {
    "rnn_forward": rnn._rnn_forward_loop, "rnn_backward": rnn._rnn_backward_loop,
    "lstm_forward": gated._lstm_forward_loop,
    "lstm_backward": gated._lstm_backward_loop,
    "gru_forward": gated._gru_forward_loop, "gru_backward": gated._gru_backward_loop,
}


CASES = [(name, xi) for name in sorted(LOOPS)
         for xi in ((False, True) if "backward" in name else (False,))]


@pytest.mark.parametrize("name, xi", CASES)
def test_scripted_loop_equals_its_python_source_bit_for_bit(name, xi):
    loop = LOOPS[name]
    # Arguments are made twice: some loops update an argument in place (LSTM's dc).
    compiled = loop(*inputs(name, xi))
    plain = loop.python(*inputs(name, xi))
    compiled = compiled if isinstance(compiled, tuple) else (compiled,)
    plain = plain if isinstance(plain, tuple) else (plain,)
    assert len(compiled) == len(plain)
    for a, b in zip(compiled, plain):
        assert torch.equal(a, b)


def test_scripted_compiles_once_up_front_and_runs_the_plain_function_off_the_cpu(
        monkeypatch):
    calls = []

    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    monkeypatch.setattr(torch.jit, "script", lambda fn: calls.append(fn) or fn)
    compiled_fn = scripted(double)
    assert calls == [double]  # compiled when decorated (at import), not at the first call
    x = torch.ones(2)
    assert torch.equal(compiled_fn(x), x * 2) and torch.equal(compiled_fn(x), x * 2)
    assert calls == [double]

    class FakeDevice:
        type = "cuda"

    class OnGpu:
        device = FakeDevice()

        def __mul__(self, k):
            return ("plain", k)

    monkeypatch.setattr(torch.jit, "script", lambda fn: (lambda *a: ("compiled",)))
    assert scripted(double)(OnGpu()) == ("plain", 2)  # not the compiled function


def test_without_torch_jit_script_the_python_loop_runs(monkeypatch):
    monkeypatch.delattr(torch.jit, "script")

    def triple(x: torch.Tensor) -> torch.Tensor:
        return x * 3

    assert torch.equal(scripted(triple)(torch.ones(2)), torch.full((2,), 3.0))
