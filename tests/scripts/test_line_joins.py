"""scripts/line_joins.py: where a d2l model's held-out loss goes at the joined line ends."""

import re
import subprocess
import sys

import pytest

from rnnlm.config import load_config
from rnnlm.data.corpus import preprocess_d2l
from rnnlm.training.run import train
from tests.conftest import ROOT

# Two kinds of line, so that word ends fall in several of the script's position bins: after
# d2l, "a bb cccc dd" (12 tokens, starting with a one-letter word) and eleven words of 60
# tokens, alternating.
SHORT = "A, bb\tcccc -- dd!"
LONG = "Aaaa bbbbb, ccccc dddd eeeee; ffff ggggg hhhh iiiii jjjj kkkkk."
LINES = [SHORT, LONG] * 200
BINS = ((0, 39), (40, 54), (55, 61))


def run_script(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "line_joins.py"), *args],
                          capture_output=True, text=True, timeout=120)


# One xdist worker runs this module, so its trained fixture is made once (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("test_line_joins")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("joins")
    text = root / "lines.txt"
    text.write_text("\n".join(LINES) + "\n")
    common = [f"data.path={text}", f"data.data_dir={root}", "data.max_tokens=null",
              "data.split=[0.9,0.05,0.05]", "train.epochs=1", "train.predict_every=0"]
    for name, preprocess in (("d2l", "d2l"), ("spaced", "d2l_spaced")):
        train(load_config(ROOT / "configs/tiny.yaml",
                          [*common, f"out_dir={root / name}", f"data.preprocess={preprocess}"]),
              quiet=True)
    return root


def expected_word_ends():
    """Per bin: (word ends, line joins) among the validation predictions, from the lines."""
    lines = [preprocess_d2l(line) for line in LINES]
    stream = "".join(lines)
    line_of, begins = [], []  # for every stream token: its line's first token
    for line in lines:
        begins.append(len(line_of))
        line_of += [begins[-1]] * len(line)
    n = len(stream)
    n_val = int(n * 0.05)
    first = n - 2 * n_val  # validation: [first, first + n_val); predictions from first + 1
    counts = {b: [0, 0] for b in BINS}
    for t in range(first + 1, first + n_val):
        join = line_of[t] == t and t > 0
        if stream[t] != " " and not join:
            continue
        position = t - line_of[t - 1]  # tokens of the previous token's line before t
        for lo, hi in BINS:
            if lo <= position <= hi:
                counts[(lo, hi)][0] += 1
                counts[(lo, hi)][1] += join
    return counts


def test_counts_the_joins_and_where_lines_end(runs):
    proc = run_script("--checkpoint", str(runs / "d2l" / "best.pt"))
    assert proc.returncode == 0, proc.stderr
    expected = expected_word_ends()
    joins = sum(j for _, j in expected.values())
    assert re.search(rf", {joins} line joins \(", proc.stdout), proc.stdout
    for (lo, hi), (ends, in_bin) in expected.items():
        row = re.search(rf"^\s+{lo}-{hi}:\s+(\d+) word ends, line ended at\s+([\d.]+)%",
                        proc.stdout, re.M)
        assert row is not None, (lo, hi, proc.stdout)
        assert int(row[1]) == ends > 0
        assert float(row[2]) == pytest.approx(100 * in_bin / ends, abs=0.05)
    assert expected[(55, 61)][1] > 0 and expected[(40, 54)][1] == 0  # the long lines' ends


def test_refuses_a_run_without_joined_lines(runs):
    proc = run_script("--checkpoint", str(runs / "spaced" / "best.pt"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "only d2l joins lines without a separator" in proc.stderr
