"""scripts/scan_speed.py: ratios within rounds, the order in turns, every model and path at
every window measured by the trainer's step (the loop path really steps), the table written
into its section."""

import importlib.util
import sys

import pytest

from rnnlm.bptt import scan
from tests.conftest import ROOT

# scripts/ is not a package: the script is loaded from its file, as `python scripts/...` runs it
_spec = importlib.util.spec_from_file_location("scan_speed", ROOT / "scripts" / "scan_speed.py")
ss = importlib.util.module_from_spec(_spec)
sys.modules["scan_speed"] = ss  # dataclasses look their module up there
_spec.loader.exec_module(ss)


def test_ratios_are_taken_within_rounds_and_the_order_alternates():
    # the medians' ratio would be 200 / 100 = 2.00x; the ratios within rounds are 1, 4 and 1.5
    assert ss.ratio_cell([100.0, 400.0, 300.0], [100.0, 100.0, 200.0]) == "1.50x (1.00-4.00)"
    assert ss.ratio_cell([3.0], [2.0]) == "1.50x"
    assert ss.in_turns(["a", "b", "c"], 3) == [["a", "b", "c"], ["c", "b", "a"],
                                               ["a", "b", "c"]]
    assert ss.speed_cell([1000.0, 3000.0, 2000.0]) == "2,000 (1,000-3,000)"


def test_a_tiny_run_measures_every_model_and_path_and_writes_its_section(
        tmp_path, data_dir, monkeypatch, capsys):
    loops = []
    real_loop = scan.linear_recurrence_loop

    def counted(a, b, h0=None, **kw):
        loops.append(b.shape[0])  # the window length it stepped through
        return real_loop(a, b, h0, **kw)

    from rnnlm.models import linear_recurrent
    monkeypatch.setitem(linear_recurrent.LINEAR_SCANS, "loop", counted)
    page = tmp_path / "bench.md"
    page.write_text("# Benchmarks\n\nprose that must survive\n")
    code = ss.main(["--windows", "5", "7", "--kinds", "lru", "mingru", "--rounds", "2",
                    "--tokens", "40", "--set", f"data.data_dir={data_dir}",
                    "--set", "model.hidden_size=8", "--set", "model.num_layers=1",
                    "--write", str(page)])
    assert code == 0
    out, err = capsys.readouterr()
    assert err.count("tokens/s") == 2 * 2 * (1 + 2 * 3)  # rounds x windows x setups
    assert sorted(set(loops)) == [5, 7]  # the loop path ran the step-by-step recurrence
    rows = [line for line in out.splitlines() if line.startswith("| 5 |")
            or line.startswith("| 7 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["LSTM", "lru", "mingru"] * 2
    for r in rows[1:3]:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert all(cells[3:6]) and cells[6].endswith(")") and "x (" in cells[7]
    text = page.read_text()
    assert "prose that must survive" in text and "<!-- bench:scan:start -->" in text
    assert "| 7 | mingru |" in text


def test_bad_counts_are_refused():
    with pytest.raises(SystemExit) as exit_info:
        ss.main(["--rounds", "0"])
    assert exit_info.value.code == 2
