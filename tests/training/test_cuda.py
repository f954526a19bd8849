"""GPU checks, skipped without CUDA: run `python -m pytest tests/training/test_cuda.py` on a
CUDA machine."""

import pytest
import torch

from rnnlm.config import load_config
from rnnlm.models import MODEL_KINDS
from rnnlm.training.run import train
from tests.conftest import ROOT
from tests.training.test_epoch import read_metrics

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_cuda_training_with_and_without_graphs_agree(kind, tiny_overrides, tmp_path):
    losses = {}
    for graphs in (False, True):
        out = tmp_path / f"g{graphs}"
        cfg = load_config(ROOT / "configs/tiny.yaml",
                          [*tiny_overrides[:1], f"out_dir={out}", "device=cuda",
                           f"model.kind={kind}", f"train.cuda_graphs={str(graphs).lower()}",
                           "train.epochs=3", "model.hidden_size=32"])
        train(cfg, quiet=True)
        losses[graphs] = [r["train_loss"] for r in read_metrics(out)]
    for a, b in zip(losses[False], losses[True]):
        assert a == pytest.approx(b, rel=1e-4)


@cuda
def test_scratch_equals_twin_on_cuda():
    from tests.models.test_models import copy_into_twin, make
    torch.manual_seed(0)
    for scratch_kind, twin_kind in [("rnn_scratch", "rnn"), ("gru_scratch", "gru"),
                                    ("lstm_scratch", "lstm")]:
        scratch = make(scratch_kind).double().cuda()
        twin = make(twin_kind).double().cuda()
        copy_into_twin(scratch, twin)
        X = torch.randint(0, 11, (3, 7), device="cuda")
        a, _ = scratch(X, scratch.begin_state(3))
        b, _ = twin(X, twin.begin_state(3))
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
