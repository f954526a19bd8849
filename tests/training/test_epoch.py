import json
import math
import subprocess
import sys

import pytest
import torch

from rnnlm.config import config_from_dict, load_config
from rnnlm.models import MODEL_KINDS, build_model, detach_state
from rnnlm.training.epoch import clip_gradients, train_epoch
from rnnlm.training.run import train
from tests.conftest import ROOT


def test_no_gradient_reaches_a_previous_batch():
    """With carried state, batch 2's loss must not reach batch 1's computation."""
    torch.manual_seed(0)
    model = build_model(config_from_dict({}, ["model.hidden_size=8"]).model, 10)
    x1 = torch.randint(0, 10, (2, 5))
    x2 = torch.randint(0, 10, (2, 5))
    state = tuple(s.requires_grad_(True) for s in model.begin_state(2))
    _, state1 = model(x1, state)
    hook = []
    state1[0].register_hook(lambda g: hook.append(g))
    carried = detach_state(state1)
    logits, _ = model(x2, carried)
    logits.sum().backward()
    assert hook == [] and state[0].grad is None and not carried[0].requires_grad
    # Without the detach the gradient does flow back: the check above can fail.
    logits, _ = model(x2, state1)
    logits.sum().backward()
    assert len(hook) == 1 and state[0].grad is not None


def test_state_is_carried_sequentially_and_reset_randomly():
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = build_model(config_from_dict({}, ["model.hidden_size=4"]).model, 5)
            self.output = self.inner.output

        def begin_state(self, b):
            seen.append("new")
            return self.inner.begin_state(b)

        def forward(self, X, state):
            seen.append("zero" if all((s == 0).all() for s in state) else "carried")
            return self.inner(X, state)

    batches = [(torch.randint(0, 5, (2, 3)), torch.randint(0, 5, (2, 3))) for _ in range(3)]
    model = Spy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_epoch(model, batches, opt, 1.0, carry_state=True, device=torch.device("cpu"))
    assert seen == ["new", "zero", "carried", "carried"]
    seen.clear()
    train_epoch(model, batches, opt, 1.0, carry_state=False, device=torch.device("cpu"))
    assert seen == ["new", "zero"] * 3


def test_clipping_matches_d2l():
    params = [torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)]
    params[0].grad = torch.tensor([3.0, 0.0, 0.0])
    params[1].grad = torch.tensor([0.0, 4.0])
    norm = clip_gradients(params, 1.0)
    assert norm.item() == pytest.approx(5.0)
    assert torch.allclose(params[0].grad, torch.tensor([0.6, 0, 0]))
    assert torch.allclose(params[1].grad, torch.tensor([0, 0.8]))
    before = [p.grad.clone() for p in params]
    clip_gradients(params, 10.0)  # under the threshold: untouched, bit for bit
    assert all(torch.equal(a, p.grad) for a, p in zip(before, params))


KEYS = {"epoch", "train_loss", "train_ppl", "tokens_per_s", "grad_norm", "lr", "wall_s"}


def read_metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_same_seed_same_metrics(tiny_overrides, tmp_path):
    runs = []
    for i in range(2):
        cfg = load_config(ROOT / "configs/tiny.yaml",
                          [*tiny_overrides[:1], f"out_dir={tmp_path / str(i)}",
                           "data.iterator=random", "model.kind=lstm_scratch"])
        train(cfg, quiet=True)
        runs.append([{k: r[k] for k in ("train_loss", "grad_norm")}
                     for r in read_metrics(tmp_path / str(i))])
    assert runs[0] == runs[1]


def test_first_epoch_loss_near_log_vocab(tiny_overrides):
    cfg = load_config(ROOT / "configs/tiny.yaml", [*tiny_overrides, "train.lr=1e-6",
                                                   "train.epochs=1"])
    record = train(cfg, quiet=True)
    assert abs(record["train_loss"] - math.log(28)) < 0.05


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_cli_trains_every_model(kind, tiny_overrides, tmp_path):
    flat = [a for o in tiny_overrides for a in ("--set", o)]
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/tiny.yaml", "--set",
         f"model.kind={kind}", "--set", "data.max_tokens=100", "--set", "model.num_layers=2",
         "--set", "model.dropout=0.2", *flat],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out_dir = tmp_path / "run"
    records = read_metrics(out_dir)
    assert [r["epoch"] for r in records] == [1, 2]
    assert KEYS <= set(records[0])
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["train_loss"]) for r in records)
    assert load_config(out_dir / "config.yaml").model.kind == kind
    last = proc.stdout.strip().splitlines()
    assert last[-1].startswith("perplexity ") and last[-1].endswith("tokens/sec on cpu")
    assert last[-2].startswith("time traveller")
    assert f"perplexity {records[-1]['train_ppl']:.1f}," in last[-1]


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_optimizers_reduce_the_loss(optimizer, tiny_overrides):
    lr = 1.0 if optimizer == "sgd" else 0.01
    cfg = load_config(ROOT / "configs/tiny.yaml",
                      [*tiny_overrides, f"train.optimizer={optimizer}", f"train.lr={lr}",
                       "train.epochs=6", "train.weight_decay=0.0001", "model.kind=gru",
                       "model.hidden_size=32"])
    train(cfg, quiet=True)
    records = read_metrics(tmp := __import__("pathlib").Path(cfg.out_dir))
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.2, tmp
