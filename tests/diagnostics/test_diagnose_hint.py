"""`diagnose --figure` on a run trained without diagnostics: the hint it gives is a command
that works, and after it the same --figure command draws the figure (the real commands, in
the order a user types them)."""

import re
import shlex
import subprocess
import sys

from tests.conftest import ROOT


def run(script, *args):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_the_hint_leads_to_a_figure(tiny_overrides, tmp_path):
    flat = [a for o in tiny_overrides for a in ("--set", o)]
    trained = run("train.py", "--config", "configs/tiny.yaml", "--set", "train.epochs=1",
                  "--set", "data.max_tokens=600", "--quiet", *flat)
    assert trained.returncode == 0, trained.stderr
    folder, fig = tmp_path / "run", tmp_path / "gradients.png"
    figure = ["--figure", "gradients", "--runs", str(folder), "--out", str(fig)]

    refused = run("diagnose.py", *figure)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    hint = re.search(r"rnnlm diagnose (--checkpoint \S+)", refused.stderr)
    assert hint, refused.stderr
    measured = run("diagnose.py", *shlex.split(hint.group(1)))
    assert measured.returncode == 0, measured.stderr

    drawn = run("diagnose.py", *figure)  # the command that failed, unchanged
    assert drawn.returncode == 0, drawn.stderr
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # two measured checkpoints: which one is asked for, by the folders to pass
    assert run("diagnose.py", "--checkpoint", str(folder / "best.pt")).returncode == 0
    several = run("diagnose.py", *figure)
    assert several.returncode == 2 and "several measured checkpoints" in several.stderr
    assert str(folder / "diagnose-best") in several.stderr
    chosen = run("diagnose.py", "--figure", "gradients", "--runs",
                 str(folder / "diagnose-best"), "--out", str(fig))
    assert chosen.returncode == 0, chosen.stderr
