"""Config errors through the real command: a YAML syntax error gives its line and column, and
a bad value is blamed on where it came from (--set, or the config file)."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT


def train(*args):
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("text, where", [
    ("seed: 0\ntrain:\n  lr: 0.1: 2\n", "at line 3, column 10: mapping values are not allowed"),
    ("seed: 0\ntrain: [epochs: 3\n", "at line 3, column 1: expected ',' or ']'"),
    ("seed: 0\nout_dir: \"runs/x\n", "at line 3, column 1: found unexpected end of stream"),
])
def test_yaml_syntax_error_gives_line_and_column(tmp_path, text, where):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    line = train("--config", str(bad))
    assert f"config file {bad} is not valid YAML {where}" in line


def test_a_bad_set_value_is_blamed_on_set(tiny_overrides):
    flat = [a for o in tiny_overrides for a in ("--set", o)]
    line = train("--config", "configs/tiny.yaml", "--set", "train.lr=abc", *flat)
    assert line == "error: --set: train.lr must be a number, got 'abc'"
    line = train("--config", "configs/tiny.yaml", "--set", "train.lrr=1", *flat)
    assert line.startswith("error: --set: unknown key train.lrr (did you mean train.lr?)")
    line = train("--config", "configs/tiny.yaml", "--set", "model=3", *flat)
    assert line == "error: --set: model must be a mapping"


def test_a_bad_file_value_is_blamed_on_the_file(tmp_path, tiny_overrides):
    flat = [a for o in tiny_overrides for a in ("--set", o)]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train:\n  lr: abc\n  epochs: 2\n")
    assert train("--config", str(cfg), *flat) == \
        f"error: {cfg}: train.lr must be a number, got 'abc'"
    # the file's other keys stay the file's when --set fixes the bad one and breaks another
    assert train("--config", str(cfg), "--set", "train.lr=0.1", "--set", "train.epochs=x",
                 *flat) == "error: --set: train.epochs must be an integer, got 'x'"
