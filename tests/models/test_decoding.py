"""Every model's own one-step decoder (model.decoder()) against the model's forward pass:
generation must run the function that was trained, for every kind, activation, layer count
and input encoding."""

import pytest
import torch

from rnnlm.models import MODEL_KINDS
from rnnlm.models.decoding import PreparedDecoder
from rnnlm.models.scratch import ScratchLM
from tests.models.test_models import V, make

CASES = [(kind, activation) for kind, cls in MODEL_KINDS.items()
         for activation in cls.activations]


def large_weights(model, seed=0):
    """Weights N(0, 0.5^2): where the kind offers activations to choose from, every W_hh's
    spectral norm is well above 1, so a linear core's state leaves [-1, 1] within a few steps
    and tanh and identity differ clearly."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    for k in range(model.num_layers if len(model.activations) > 1 else 0):
        assert torch.linalg.matrix_norm(model.recurrent_weight(k), ord=2) > 1.5
    return model


def forward_carried(model, ids, split):
    """The model's logits (T, V) over ids (1-D), run as two windows with the state carried."""
    with torch.no_grad():
        first, state = model(ids[:split].view(1, -1), model.begin_state(1))
        second, _ = model(ids[split:].view(1, -1), state)
    return torch.cat([first, second])[:, 0]


@pytest.mark.parametrize("kind, activation", CASES)
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("emb", [None, 5])
def test_decoder_logits_equal_the_model(kind, activation, layers, emb):
    drop_connect = 0.3 if MODEL_KINDS[kind].supports.weight_dropout else 0.0

    def build(act):
        return make(kind, num_layers=layers, embedding_dim=emb, activation=act, dropout=0.3,
                    output_dropout=0.3, weight_dropout=drop_connect).double()

    model = large_weights(build(activation))
    torch.manual_seed(1)
    ids = torch.randint(0, V, (12,))
    model.eval()
    expected = forward_carried(model, ids, 5)  # (12, V)

    # The weights make the activation matter: the same weights under any other activation
    # this kind offers give clearly different logits (a decoder with the wrong cell fails).
    for other in MODEL_KINDS[kind].activations:
        if other != activation:
            other_model = build(other)
            other_model.load_state_dict(model.state_dict())
            other_model.eval()
            assert (forward_carried(other_model, ids, 5) - expected).abs().max() > 0.5

    # Token by token from the fresh state; building the decoder puts the model in eval mode.
    model.train()
    decoder = model.decoder()
    assert not model.training
    assert isinstance(decoder, PreparedDecoder) == isinstance(model, ScratchLM)
    got = torch.cat([decoder.step(int(i)) for i in ids])
    assert not got.requires_grad  # generation records no autograd graph
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)

    # A prefix fed as one window, steps, then another window that continues from the
    # stepped state, then steps again.
    decoder = model.decoder()
    got = [decoder.feed(ids[:4])] + [decoder.step(int(i)) for i in ids[4:8]]
    got += [decoder.feed(ids[8:10])] + [decoder.step(int(i)) for i in ids[10:]]
    positions = [3, 4, 5, 6, 7, 9, 10, 11]
    torch.testing.assert_close(torch.cat(got), expected[positions], atol=1e-10, rtol=1e-10)

