"""The best so far (rnnlm.training.best) through the checkpoint keys, and the progress bar
switch of train()."""

import io

import torch

from rnnlm.config import load_config
from rnnlm.training.best import BestSoFar
from rnnlm.training.run import train
from tests.conftest import ROOT


def record(epoch, train_ppl, val_ppl=None):
    return {"epoch": epoch, "train_ppl": train_ppl,
            **({"val_ppl": val_ppl} if val_ppl is not None else {})}


def test_best_so_far_continues_from_the_checkpoint_keys():
    model = torch.nn.Linear(2, 2)
    best = BestSoFar(patience=2)
    assert not best.validated(5.0, 1, model) and best.improved_by(record(1, 9.0, 5.0))
    assert not best.validated(6.0, 2, model) and not best.improved_by(record(2, 8.0, 6.0))
    run_state = {"early_stop": best.stopper.state_dict(),
                 "best_weights": best.weights.state_dict()}

    resumed = BestSoFar(patience=2)
    resumed.restore(best.metric, run_state)
    assert resumed.metric == {"metric": "val_ppl", "value": 5.0, "epoch": 1}
    assert resumed.weights.epoch == 1 and resumed.stopper.bad_evaluations == 1
    assert torch.equal(resumed.weights.state["weight"], model.weight)
    assert resumed.validated(7.0, 3, model)  # the second evaluation without improvement


def test_best_so_far_from_a_checkpoint_without_run_state():
    """Checkpoints of older versions hold only `best`: the rest starts afresh."""
    best = BestSoFar(patience=1)
    best.restore({"metric": "train_ppl", "value": 3.0, "epoch": 4}, None)
    assert best.weights.epoch is None and best.stopper.bad_evaluations == 0
    assert not best.improved_by(record(5, 3.5)) and best.improved_by(record(5, 4.0, 9.0))


def test_progress_true_draws_the_bar_even_off_a_terminal(tiny_overrides):
    cfg = load_config(ROOT / "configs/tiny.yaml", tiny_overrides)
    out = io.StringIO()
    train(cfg, quiet=True, out=out, progress=True)
    assert "2/2 [" in out.getvalue()
    out = io.StringIO()
    train(cfg, out=out, overwrite=True)  # None: a bar only on a terminal
    assert "2/2 [" not in out.getvalue() and "parameters" in out.getvalue()
