import math

import pytest
import torch
import torch.nn.functional as F

from rnnlm.config import ModelConfig
from rnnlm.models import MODEL_KINDS, build_model

V = 11
TWINS = {"rnn_scratch": "rnn", "gru_scratch": "gru", "lstm_scratch": "lstm"}
#: the kinds whose state is two tensors per layer: (h, c), and the LRU's (Re h, Im h)
TWO_STATE_TENSORS = ("lstm_scratch", "lstm", "lru")


def make(kind, **kw):
    cfg = ModelConfig(kind=kind, hidden_size=kw.pop("hidden_size", 8), **kw)
    return build_model(cfg, V)


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
@pytest.mark.parametrize("layers, emb", [(1, None), (2, None), (3, 5)])
def test_shapes_for_every_model(kind, layers, emb):
    model = make(kind, num_layers=layers, embedding_dim=emb, dropout=0.1 if layers > 1 else 0)
    X = torch.randint(0, V, (4, 6))
    state = model.begin_state(4)
    assert all(s.shape == (layers, 4, 8) for s in state)
    assert len(state) == (2 if kind in TWO_STATE_TENSORS else 1)
    logits, new = model(X, state)
    assert logits.shape == (6, 4, V)
    assert [s.shape for s in new] == [s.shape for s in state]


def copy_into_twin(scratch, twin):
    """Copy a scratch model's weights into its torch.nn twin (same layout, other names)."""
    with torch.no_grad():
        for k, layer in enumerate(scratch.layers):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(twin.rnn, f"{name}_l{k}").copy_(getattr(layer, name))
        twin.output.load_state_dict(scratch.output.state_dict())
        if scratch.embedding is not None:
            twin.embedding.load_state_dict(scratch.embedding.state_dict())


def twin_grads(scratch, twin):
    pairs = [(scratch.output.weight, twin.output.weight), (scratch.output.bias, twin.output.bias)]
    for k, layer in enumerate(scratch.layers):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            pairs.append((getattr(layer, name), getattr(twin.rnn, f"{name}_l{k}")))
    return pairs


@pytest.mark.parametrize("scratch_kind", list(TWINS))
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("emb", [None, 6])
@pytest.mark.parametrize("backward", ["manual", "autograd"])
def test_scratch_equals_torch_twin_float64(scratch_kind, layers, emb, backward):
    torch.manual_seed(0)
    scratch = make(scratch_kind, num_layers=layers, embedding_dim=emb,
                   backward=backward).double()
    twin = make(TWINS[scratch_kind], num_layers=layers, embedding_dim=emb).double()
    with torch.no_grad():  # larger weights than D2L's 0.01 so the test exercises the gates
        for p in scratch.parameters():
            p.normal_(0, 0.5)
    copy_into_twin(scratch, twin)
    X = torch.randint(0, V, (3, 7))
    Y = torch.randint(0, V, (3, 7))
    init = tuple(torch.randn_like(s) for s in scratch.begin_state(3))
    outs = []
    for model in (scratch, twin):
        state = tuple(s.clone().requires_grad_(True) for s in init)
        logits, final = model(X, state)
        loss = F.cross_entropy(logits.reshape(-1, V), Y.t().reshape(-1))
        loss = loss + sum((f ** 2).sum() for f in final)  # final state gets gradient too
        loss.backward()
        outs.append((logits, final, [s.grad for s in state]))
    (l1, f1, g1), (l2, f2, g2) = outs
    torch.testing.assert_close(l1, l2, atol=1e-10, rtol=1e-10)
    for a, b in zip(f1, f2):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    for a, b in twin_grads(scratch, twin):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-10)


def test_backward_choice_builds_the_right_path():
    assert make("lstm_scratch").layers[0].window is not None  # auto = manual
    assert make("lstm_scratch", backward="autograd").layers[0].window is None


def test_twin_check_can_fail():
    """The twin comparison is not vacuous: a perturbed weight breaks it."""
    torch.manual_seed(0)
    scratch, twin = make("gru_scratch").double(), make("gru").double()
    copy_into_twin(scratch, twin)
    with torch.no_grad():
        twin.rnn.bias_hh_l0[-1] += 1e-3  # only the candidate's recurrent bias
    X = torch.randint(0, V, (2, 5))
    a, _ = scratch(X, scratch.begin_state(2))
    b, _ = twin(X, twin.begin_state(2))
    assert not torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_first_loss_is_close_to_log_vocab(kind):
    torch.manual_seed(0)
    model = make(kind, hidden_size=32)
    X, Y = torch.randint(0, V, (8, 10)), torch.randint(0, V, (8, 10))
    logits, _ = model(X, model.begin_state(8))
    loss = F.cross_entropy(logits.reshape(-1, V), Y.t().reshape(-1)).item()
    assert abs(loss - math.log(V)) < 0.1


def test_scratch_init_follows_d2l():
    model = make("rnn_scratch", hidden_size=64)
    w = model.layers[0].weight_hh
    assert abs(w.std().item() - 0.01) < 0.002 and model.layers[0].bias_ih.abs().sum() == 0
