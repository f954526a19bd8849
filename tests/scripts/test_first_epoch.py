"""scripts/first_epoch.py: it times the trainer's own first epoch (the same loss)."""

import json
import re
import subprocess
import sys

from rnnlm.config import load_config
from rnnlm.training.run import train
from tests.conftest import ROOT


def test_first_epoch_times_the_trainers_epoch(tmp_path, tiny_overrides):
    sets = [*tiny_overrides, "model.kind=lstm", "model.embedding_dim=8",
            "model.weight_dropout=0.3", "train.optimizer=adamw", "train.lr=0.01",
            "train.ema_decay=0.9"]
    train(load_config(ROOT / "configs" / "tiny.yaml", sets), quiet=True)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "first_epoch.py"),
                           "--config", str(ROOT / "configs" / "tiny.yaml"),
                           *[a for s in sets for a in ("--set", s)]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    epochs = re.findall(r"^epoch (\d): .* loss (\S+);", proc.stdout, re.MULTILINE)
    assert [e for e, _ in epochs] == ["1", "2"]
    assert float(epochs[0][1]) == first["train_loss"]
