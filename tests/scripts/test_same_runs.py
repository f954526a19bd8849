"""scripts/same_runs.py: the check that a change of shape changed nothing computed."""

import subprocess
import sys

from rnnlm.config import load_config
from rnnlm.training.run import train
from tests.conftest import ROOT


def same_runs(*runs):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "same_runs.py"),
                           *map(str, runs)], capture_output=True, text=True, timeout=120)


def test_same_runs_tells_equal_runs_from_different_ones(tmp_path, tiny_overrides):
    def run(name, *extra):
        cfg = load_config(ROOT / "configs" / "tiny.yaml",
                          [*tiny_overrides, f"out_dir={tmp_path / name}", *extra])
        train(cfg, quiet=True)
        return tmp_path / name

    a, b, c = run("a"), run("b"), run("c", "seed=1")
    same = same_runs(a, b)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "metrics same, last.pt same, best.pt same" in same.stdout
    differ = same_runs(a, b, a, c)
    assert differ.returncode == 1
    assert differ.stdout.splitlines()[1].endswith("metrics DIFFERENT, last.pt DIFFERENT, "
                                                  "best.pt DIFFERENT")
    assert same_runs(a).returncode == 2  # an odd number of folders
