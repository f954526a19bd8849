"""scripts/line_joins.py: where a d2l model's held-out loss goes at the joined line ends."""

import re
import subprocess
import sys

import pytest

from rnnlm.config import load_config
from rnnlm.trainer import train
from tests.conftest import ROOT

LINE = "Aaa, bb\tcccc -- dd!"  # 14 tokens after d2l: "aaa bb cccc dd"
LINES = 400  # 5,600 tokens: 90/5/5 leaves 280 for validation


def run_script(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "line_joins.py"), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("joins")
    text = root / "lines.txt"
    text.write_text("\n".join([LINE] * LINES) + "\n")
    common = [f"data.path={text}", f"data.data_dir={root}", "data.max_tokens=null",
              "data.split=[0.9,0.05,0.05]", "train.epochs=1", "train.predict_every=0"]
    for name, preprocess in (("d2l", "d2l"), ("spaced", "d2l_spaced")):
        train(load_config(ROOT / "configs/tiny.yaml",
                          [*common, f"out_dir={root / name}", f"data.preprocess={preprocess}"]),
              quiet=True)
    return root


def test_counts_the_joins_and_where_lines_end(runs):
    proc = run_script("--checkpoint", str(runs / "d2l" / "best.pt"))
    assert proc.returncode == 0, proc.stderr
    # Validation holds stream tokens 5,040-5,319 (5,600 - 2 x 280); 5,041-5,319 are
    # predicted, and a line starts at every multiple of 14 among them.
    joins = len([t for t in range(5041, 5320) if t % 14 == 0])
    assert f"279 predictions, {joins} line joins" in proc.stdout
    # The word ends of a line come after 3, 6, 11 and 14 of its tokens: only the last one is
    # a line end, so a quarter of the word ends in 0-39 are joins.
    rows = re.findall(r"^\s+0-39:\s+(\d+) word ends, line ended at\s+([\d.]+)%", proc.stdout,
                      re.M)
    word_ends, ended = int(rows[0][0]), float(rows[0][1])
    assert len(rows) == 1 and ended == pytest.approx(100 * joins / word_ends, abs=0.05)
    assert abs(word_ends - 4 * joins) <= 3  # 4 word ends per line, up to the edges


def test_refuses_a_run_without_joined_lines(runs):
    proc = run_script("--checkpoint", str(runs / "spaced" / "best.pt"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "only d2l joins lines without a separator" in proc.stderr
