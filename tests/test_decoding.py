import pytest
import torch

from rnnlm.models import MODEL_KINDS
from rnnlm.models.decoding import ScratchDecoder, make_decoder
from tests.test_models import make


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
@pytest.mark.parametrize("layers, emb", [(1, None), (2, None), (2, 5)])
def test_decoder_steps_equal_the_model(kind, layers, emb):
    torch.manual_seed(0)
    model = make(kind, num_layers=layers, embedding_dim=emb, dropout=0.3).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4)
    ids = torch.randint(0, 11, (12,))
    model.eval()
    expected, _ = model(ids.view(1, -1), model.begin_state(1))  # (12, 1, V)
    decoder = make_decoder(model)
    assert isinstance(decoder, ScratchDecoder) == kind.endswith("_scratch")
    got = [decoder.feed(ids[:4])]
    with torch.no_grad():
        got += [decoder.step(int(i)) for i in ids[4:]]
    torch.testing.assert_close(torch.cat(got), expected[3:, 0], atol=1e-10, rtol=1e-10)
    # A prefix fed after steps continues from the stepped state.
    decoder.feed(ids[:2])
