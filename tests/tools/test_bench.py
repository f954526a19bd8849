"""bench.py: rounds taken in turns, per-round ratios, and the report it writes."""

import json
import stat
import subprocess
import sys

import pytest

from rnnlm.commands import run_script
from rnnlm.config import ConfigError
from rnnlm.tools import bench
from tests.conftest import ROOT


def test_paired_speeds_runs_the_trainers_in_turns(monkeypatch, tmp_path):
    order = []
    ours_speed = iter([100.0, 50.0, 200.0, 90.0, 80.0, 160.0])
    ref_speed = iter([10.0, 20.0, 40.0])

    def fake_ours(preset, epochs, warmup, out_root, device, overrides):
        order.append(("ours", tuple(overrides), epochs))
        return {"tokens_per_s": next(ours_speed)}

    def fake_reference(preset, epochs):
        order.append(("ref", epochs))
        return {"tokens_per_s": next(ref_speed)}

    roofline = iter([1.0, 2.0, 3.0])

    def fake_roofline():
        order.append(("roofline",))
        return next(roofline)

    monkeypatch.setattr(bench, "run_ours", fake_ours)
    monkeypatch.setattr(bench, "run_reference", fake_reference)
    speeds = bench.paired_speeds("rnn", ["", "train.threads=1"],
                                 lambda s: s.split(",") if s else [], rounds=3, epochs=5,
                                 warmup=2, out_root=tmp_path, device="cpu",
                                 use_reference=True, measure_roofline=fake_roofline)
    assert order == [("ours", (), 7), ("ours", ("train.threads=1",), 7), ("roofline",),
                     ("ref", 5)] * 3
    assert speeds == {"": [100.0, 200.0, 80.0], "train.threads=1": [50.0, 90.0, 160.0],
                      "roofline": [1.0, 2.0, 3.0], "ref": [10.0, 20.0, 40.0]}
    # per-round ratios, not a ratio of medians (which would be 100 / 20 = 5)
    assert bench.paired_ratios(speeds[""], speeds["ref"]) == [10.0, 10.0, 2.0]
    assert bench.paired_ratios([1.0, 2.0], [None, 4.0]) == [0.5]
    assert bench.median_or_none([None, None]) is None


def test_bench_writes_its_table_with_the_reference_of_each_round(tmp_path, monkeypatch,
                                                                 tiny_overrides):
    fake = tmp_path / "d2l_reference.sh"
    fake.write_text("#!/bin/sh\necho '" + json.dumps({"ppl": 9.5, "tokens_per_s_median": 1000.0})
                    + "'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(bench, "REFERENCE", fake)
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nprose that must survive\n")
    assert run_script("bench", ["--presets", "rnn", "--epochs", "2", "--warmup", "1",
                                "--rounds", "2", "--round-epochs", "1", "--gen-chars", "0",
                                "--write", str(out), "--set", tiny_overrides[0]]) == 0
    text = out.read_text()
    assert "prose that must survive" in text and "<!-- bench:cpu data.data_dir=" in text
    row = next(line for line in text.splitlines() if line.startswith("| rnn |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    precision, ours, ref, ratio = cells[1], float(cells[2].replace(",", "")), cells[3], cells[4]
    assert precision in ("fp32", "bf16")  # what train.precision: auto resolved to here
    assert ref == "1,000" and cells[-1] == "9.500"
    low, high = (float(x) for x in ratio.split("(")[1].rstrip(")").split("-"))
    assert low <= float(ratio.split("x")[0]) <= high
    assert float(ratio.split("x")[0]) == pytest.approx(ours / 1000, abs=0.01)  # as printed
    # the roofline is measured in each of the two rounds: a median fraction within its range
    fraction = cells[-3]
    low, high = (float(x) for x in fraction.split("(")[1].rstrip("%)").split("-"))
    assert 0 < low <= float(fraction.split("%")[0]) <= high


def test_a_variant_that_does_not_apply_to_a_preset_is_left_out(capsys):
    def overrides(setting):
        return setting.split(",") if setting else []
    settings = ["", "model.backward=autograd", "train.threads=1"]
    assert bench.applicable_settings("lstm_scratch", settings, overrides) == settings
    assert bench.applicable_settings("lstm", settings, overrides) == ["", "train.threads=1"]
    assert "variant model.backward=autograd left out" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="model.backward"):  # the preset itself must load
        bench.applicable_settings("lstm", [""], lambda s: ["model.backward=autograd"])


@pytest.mark.parametrize("args,match", [
    (["--epochs", "2"], "no epoch after the 2 warm-up"),
    (["--epochs", "3", "--warmup", "-1"], "--warmup must be >= 0"),
    (["--epochs", "3", "--round-epochs", "0"], "--round-epochs >= 1"),
])
def test_counts_that_leave_nothing_to_measure_are_one_line_errors(args, match):
    """Checked before any training (the long run of 2 epochs after 2 warm-up ones used to end
    in a traceback from an empty median); run through the real script: exit 2, one line."""
    result = subprocess.run([sys.executable, "bench.py", "--no-reference", "--write", "",
                             *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and match in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
