"""The optimizers run on PyTorch's fused kernels, which agree with the default foreach
kernels to float32 rounding, and a resumed run keeps its own kernels and state placement."""

import pytest
import torch

from rnnlm.checkpoint import restore_training
from rnnlm.config import Config
from rnnlm.models import build_model
from rnnlm.training.run import make_optimizer


def model_and_config(optimizer: str):
    cfg = Config()
    cfg.model.kind, cfg.model.hidden_size, cfg.model.num_layers = "lstm", 16, 2
    cfg.model.embedding_dim = 8
    cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay = optimizer, 0.01, 0.01
    torch.manual_seed(0)
    return build_model(cfg.model, 12, cfg.train), cfg


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_fused_updates_equal_the_default_kernels(optimizer):
    model, cfg = model_and_config(optimizer)
    fused = make_optimizer(cfg, model)
    assert all(group["fused"] for group in fused.param_groups)
    twin, _ = model_and_config(optimizer)
    twin.load_state_dict(model.state_dict())
    plain = type(fused)(twin.parameters(), lr=cfg.train.lr,
                        weight_decay=cfg.train.weight_decay)  # foreach: PyTorch's default
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        for a, b in zip(model.parameters(), twin.parameters()):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        fused.step()
        plain.step()
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(),
                                                            twin.parameters()))
    assert moved < 1e-6
    assert any((p - q).abs().max() > 0 for p, q in zip(model.state_dict().values(),
               model_and_config(optimizer)[0].state_dict().values()))  # it did train


def test_a_resumed_run_keeps_its_own_kernels(monkeypatch):
    """A checkpoint saved by a foreach optimizer (an older run) resumes on fused kernels."""
    model, cfg = model_and_config("adamw")
    saved = torch.optim.AdamW(model.parameters(), lr=0.01, foreach=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    saved.step()
    ckpt = {"optimizer": saved.state_dict(), "progress": {"epoch": 1}}
    fresh = make_optimizer(cfg, model)
    monkeypatch.setattr("rnnlm.checkpoint.check_compatible", lambda *a: None)
    monkeypatch.setattr("rnnlm.checkpoint.load_model_weights", lambda *a: None)
    monkeypatch.setattr("rnnlm.checkpoint.checkpoint_config", lambda *a: cfg)
    restore_training(ckpt, cfg, model, fresh, vocab=None, where="x")
    assert all(g["fused"] and not g["foreach"] for g in fresh.param_groups)
    assert all(fresh.state[p]["step"].dtype == torch.float32 for p in model.parameters())
    fresh.step()  # the fused kernel accepts the loaded state


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_transposed_and_expanded_gradients_update_the_right_elements(optimizer):
    """PyTorch's fused CPU kernels read a non-contiguous gradient as if it were contiguous
    (a wrong update, no error): make_optimizer's step hook gives them contiguous copies."""
    model, cfg = model_and_config(optimizer)
    fused = make_optimizer(cfg, model)
    twin, _ = model_and_config(optimizer)
    twin.load_state_dict(model.state_dict())
    plain = type(fused)(twin.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        for a, b in zip(model.parameters(), twin.parameters()):
            if a.dim() == 2:
                a.grad = torch.randn(tuple(reversed(a.shape)), generator=gen).t()
            else:
                a.grad = torch.randn(1, generator=gen).expand(a.shape)
            b.grad = a.grad.clone()
        assert not all(p.grad.is_contiguous() for p in model.parameters())
        fused.step()
        plain.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_weight_decay_leaves_what_the_model_exempts():
    """The LRU's eigenvalue parameters (nu, theta, gamma) take no weight decay, as in the
    paper; every other weight does, and the classic kinds decay every weight."""
    cfg = Config()
    cfg.model.kind, cfg.model.hidden_size, cfg.model.num_layers = "lru", 8, 2
    cfg.model.embedding_dim = 8
    cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay = "adamw", 0.1, 0.5
    model = build_model(cfg.model, 12, cfg.train)
    exempt = model.no_weight_decay()
    assert exempt and all(name.rsplit(".", 1)[-1] in ("nu_log", "theta_log", "gamma_log")
                          for name in exempt)
    optimizer = make_optimizer(cfg, model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # only the decay moves a weight
    optimizer.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (name not in exempt and bool(before[name].abs().sum() > 0)), name
    classic, _ = model_and_config("adamw")
    assert classic.no_weight_decay() == set()
    assert len(make_optimizer(cfg, classic).param_groups) == 1
