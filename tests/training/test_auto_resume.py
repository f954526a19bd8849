"""train.auto_resume: what a command finds in out_dir decides between continue and start."""

import sys

import pytest

import train as train_entry
from rnnlm.checkpoint import CheckpointError
from rnnlm.config import ConfigError, load_config
from rnnlm.training import auto_resume
from rnnlm.training.run import train
from tests.conftest import ROOT

SETTINGS = ["train.threads=1", "train.predict_every=0", "data.max_tokens=600",
            "train.auto_resume=true", "train.checkpoint_every=0"]


def config(tiny_overrides, *more):
    return load_config(ROOT / "configs/tiny.yaml", [*tiny_overrides, *SETTINGS, *more])


def test_plan_follows_what_out_dir_holds(tiny_overrides, tmp_path):
    cfg = config(tiny_overrides, "train.epochs=1")
    assert auto_resume.plan(cfg) == auto_resume.AutoResume(overwrite=True)  # nothing there
    train(cfg, quiet=True)
    last = tmp_path / "run" / "last.pt"
    assert auto_resume.plan(cfg).done and auto_resume.plan(cfg).path == last
    more = auto_resume.plan(config(tiny_overrides, "train.epochs=2"))
    assert not more.done and more.path == last and more.checkpoint["progress"]["epoch"] == 1
    with pytest.raises(CheckpointError, match="train.auto_resume: model.hidden_size=8: "):
        auto_resume.plan(config(tiny_overrides, "train.epochs=2", "model.hidden_size=8"))
    with pytest.raises(ConfigError, match="--overwrite starts the run over"):
        auto_resume.plan(cfg, overwrite=True)
    # Only best.pt (lost before the first last.pt): this run's may be replaced, another's not.
    last.unlink()
    assert auto_resume.plan(cfg).overwrite
    assert not auto_resume.plan(config(tiny_overrides, "train.lr=0.5")).overwrite


def test_the_same_command_twice_continues_then_stops(tiny_overrides, tmp_path, monkeypatch,
                                                    capsys):
    flat = [a for o in [*tiny_overrides, *SETTINGS] for a in ("--set", o)]

    def run(epochs):
        monkeypatch.setattr(sys, "argv", ["train.py", "--quiet", "--config",
                                          str(ROOT / "configs/tiny.yaml"), *flat,
                                          "--set", f"train.epochs={epochs}"])
        return train_entry.main()

    assert run(1) == 0 and run(2) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"epoch": 2' in lines[1]
    capsys.readouterr()
    assert run(2) == 0 and "nothing left to train" in capsys.readouterr().err
