"""The dropout masks (base.keep_mask): the right rate and scale, one mask per lane for locked
dropout, and the torch.nn models' CPU training drawing them between layers instead of the
layer's inner dropout."""

import pytest
import torch

from rnnlm.config import Config
from rnnlm.models import build_model
from rnnlm.models.base import Dropout, LockedDropout, drop, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_masks_drop_p_and_keep_the_expectation(p):
    torch.manual_seed(0)
    mask = keep_mask((1000, 1000), p, torch.ones(1))
    assert mask.unique().tolist() == pytest.approx([0.0, 1 / (1 - p)])
    assert (mask == 0).float().mean().item() == pytest.approx(p, abs=0.003)
    assert mask.mean().item() == pytest.approx(1.0, abs=0.005)


def test_masks_follow_the_tensors_dtype_and_the_seed():
    x = torch.ones(8, 8, dtype=torch.bfloat16)
    assert keep_mask(x.shape, 0.3, x).dtype == torch.bfloat16
    torch.manual_seed(1)
    a = drop(torch.ones(64), 0.3)
    torch.manual_seed(1)
    assert torch.equal(a, drop(torch.ones(64), 0.3))
    assert drop(x, 0.3, training=False) is x and drop(x, 0.0) is x


def test_per_step_and_locked_masks():
    torch.manual_seed(0)
    x = torch.ones(50, 4, 16, requires_grad=True)
    per_step = Dropout(0.5)(x)
    locked = LockedDropout(0.5)(x)
    assert not torch.equal(per_step[0], per_step[1])  # a fresh mask every step
    assert torch.equal(locked[0], locked[1]) and torch.equal(locked[0], locked[-1])
    per_step.sum().backward()
    assert torch.equal(x.grad, per_step.detach())  # the gradient goes through the mask
    assert Dropout(0.5).eval()(x) is x


def test_torch_nn_training_on_the_cpu_drops_between_layers_with_these_masks(monkeypatch):
    cfg = Config()
    cfg.model.kind, cfg.model.hidden_size, cfg.model.num_layers = "lstm", 16, 2
    cfg.model.embedding_dim, cfg.model.dropout, cfg.model.cell_kernel = 8, 0.4, "torch"
    model = build_model(cfg.model, 12).train()
    drawn = []
    real = keep_mask
    monkeypatch.setattr("rnnlm.models.base.keep_mask",
                        lambda shape, p, like: drawn.append(tuple(shape)) or real(shape, p, like))
    monkeypatch.setattr(model.rnn, "forward", lambda *a: pytest.fail("the stacked call ran"))
    logits, _ = model(torch.randint(0, 12, (3, 5)), model.begin_state(3))
    assert drawn == [(5, 3, 16)]  # the lower layer's output, once
    assert logits.shape == (5, 3, 12)
