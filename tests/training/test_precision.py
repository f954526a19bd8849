"""train.precision (bf16 autocast) and train.compile (torch.compile of the training model)."""

import pytest
import torch

from rnnlm.config import ConfigError, config_from_dict, load_config
from rnnlm.config.checks import resolve_precision
from rnnlm.kernels import native
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


@pytest.mark.parametrize("kind", [kind for kind, cls in MODEL_KINDS.items()
                                  if cls.supports.bf16])
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


def test_manual_backward_is_refused_under_compile_only():
    with pytest.raises(ConfigError, match="model.backward: manual"):
        config_from_dict({}, ["model.kind=gru_scratch", "model.backward=manual",
                              "train.compile=true"])
    config_from_dict({}, ["model.kind=gru_scratch", "model.backward=manual",
                          "train.precision=bf16"])
    # auto picks autograd under compile, and under bf16 off the CPU (where no C windows
    # multiply in bf16); the hand-written backward otherwise
    assert small_model("gru_scratch", "train.compile=true").layers[0].window is None
    assert small_model("gru_scratch").layers[0].window is not None
    assert small_model("gru_scratch", "train.precision=bf16").layers[0].window is not None
    cfg = config_from_dict({}, ["model.kind=gru_scratch", "train.precision=bf16"])
    assert build_model(cfg.model, 9, cfg.train, "cuda").layers[0].window is None


@pytest.mark.parametrize("device,native_bf16,kind,expected", [
    ("cpu", True, "gru_scratch", "bf16"),
    ("cpu", False, "gru_scratch", "fp32"),
    ("cuda", True, "lstm", "fp32"),
    ("cpu", True, "mingru", "fp32"),  # a kind that does not offer bf16
])
def test_auto_precision_is_bf16_where_the_cpu_multiplies_it(device, native_bf16, kind,
                                                            expected, monkeypatch):
    monkeypatch.setattr(native, "cpu_multiplies_bf16", lambda: native_bf16)
    cfg = config_from_dict({}, [f"model.kind={kind}", "model.embedding_dim=16",
                                "train.precision=auto"])
    assert resolve_precision(cfg, torch.device(device)) == expected
    for fixed in ("fp32", "bf16"):
        cfg.train.precision = fixed
        assert resolve_precision(cfg, torch.device(device)) == fixed


def test_auto_precision_trains_as_its_resolution(tiny_overrides, tmp_path, monkeypatch):
    """A run with train.precision: auto computes as the precision it resolves to, and keeps
    auto in its saved config (a resume on another machine resolves again)."""
    finals = {}
    for native_bf16 in (True, False):
        monkeypatch.setattr(native, "cpu_multiplies_bf16", lambda v=native_bf16: v)
        for precision in ("auto", "bf16" if native_bf16 else "fp32"):
            out = tmp_path / f"{precision}-{native_bf16}"
            cfg = load_config(ROOT / "configs/tiny.yaml",
                              [*tiny_overrides[:1], f"out_dir={out}", "model.kind=gru_scratch",
                               "train.epochs=2", f"train.precision={precision}",
                               "train.predict_every=0"])
            train(cfg, quiet=True)
            finals[precision, native_bf16] = read_metrics(out)[-1]["train_ppl"]
            assert load_config(out / "config.yaml").train.precision == precision
    assert finals["auto", True] == finals["bf16", True]
    assert finals["auto", False] == finals["fp32", False]
    assert finals["bf16", True] != finals["fp32", False]


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


def test_the_run_says_when_it_computes_in_bf16(tiny_overrides, tmp_path, monkeypatch):
    import io
    monkeypatch.setattr(native, "cpu_multiplies_bf16", lambda: True)
    for precision, said in (("auto", ", bf16 (train.precision: auto)"), ("bf16", ", bf16"),
                            ("fp32", None)):
        cfg = load_config(ROOT / "configs/tiny.yaml",
                          [*tiny_overrides[:1], f"out_dir={tmp_path / precision}",
                           "model.kind=gru_scratch", "train.epochs=1",
                           f"train.precision={precision}", "train.predict_every=0"])
        out = io.StringIO()
        train(cfg, out=out)
        header = out.getvalue().splitlines()[0]
        assert (said is not None and said in header) or (said is None and "bf16" not in header)
