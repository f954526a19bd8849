import subprocess
import sys

import pytest
import torch

from rnnlm.config import ConfigError, config_from_dict, load_config
from tests.conftest import ROOT


def test_presets_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.model.kind


def test_book_presets_match_the_book():
    for name in ["rnn_scratch", "rnn_scratch_random", "gru_scratch", "lstm_scratch", "rnn",
                 "gru", "lstm"]:
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert (cfg.data.batch_size, cfg.data.num_steps, cfg.data.max_tokens) == (32, 35, 10000)
        assert (cfg.train.optimizer, cfg.train.lr, cfg.train.clip_norm) == ("sgd", 1.0, 1.0)
        assert cfg.train.epochs == 500
        assert cfg.model.hidden_size == (512 if name.startswith("rnn_scratch") else 256)
    assert load_config(ROOT / "configs/rnn_scratch_random.yaml").data.iterator == "random"


def test_overrides_are_typed():
    cfg = config_from_dict({}, ["train.epochs=7", "train.lr=0.5", "data.max_tokens=null",
                                "model.kind=lstm", "train.clip_norm=2"])
    assert cfg.train.epochs == 7 and cfg.train.lr == 0.5 and cfg.data.max_tokens is None
    assert cfg.model.kind == "lstm" and isinstance(cfg.train.clip_norm, float)


@pytest.mark.parametrize("raw, overrides, fragment", [
    ({"trian": {}}, [], "unknown key trian (did you mean train?)"),
    ({}, ["train.epoks=3"], "unknown key train.epoks (did you mean train.epochs?)"),
    ({}, ["train.epochs=many"], "train.epochs must be an integer"),
    ({}, ["train.epochs=2.5"], "train.epochs must be an integer"),
    ({}, ["data.batch_size=0"], "data.batch_size must be >= 1"),
    ({}, ["train.lr=-1"], "train.lr must be > 0"),
    ({}, ["data.iterator=shuffled"], "data.iterator must be one of sequential, random"),
    ({}, ["model.kind=transformer"], "model.kind must be one of"),
    ({}, ["model.dropout=1.5"], "model.dropout must be in [0, 1)"),
    ({"data": 3}, [], "data must be a mapping"),
    ({}, ["model.kind=lstm", "model.backward=manual"],
     "model.backward: manual is offered for rnn_scratch, gru_scratch, lstm_scratch, lru, "
     "mingru, minlstm only"),
    ({}, ["epochs"], "must look like key=value"),
])
def test_bad_values_name_the_key(raw, overrides, fragment):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, overrides)
    assert fragment in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [epochs: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)


def run_train(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args, fragment", [
    (["--config", "configs/nope.yaml"], "config file configs/nope.yaml not found"),
    (["--config", "configs/tiny.yaml", "--set", "train.epochs=-3"], "train.epochs must be"),
    (["--config", "configs/tiny.yaml", "--set", "data.path=/nonexistent.txt"],
     "data.path /nonexistent.txt does not exist"),
    (["--config", "configs/tiny.yaml", "--set", "data.num_steps=600"], "needs at least"),
])
def test_cli_errors_are_one_line_exit_2(args, fragment, tiny_overrides):
    flat = [a for o in tiny_overrides for a in ("--set", o)]
    proc = run_train(*args, *flat)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_a_clear_error(tiny_overrides):
    flat = [a for o in tiny_overrides for a in ("--set", o)]
    proc = run_train("--config", "configs/tiny.yaml", "--set", "device=cuda", *flat)
    assert proc.returncode == 2 and "CUDA is not available" in proc.stderr
    assert "Traceback" not in proc.stderr
