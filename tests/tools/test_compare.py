"""compare.py: variants, aggregation over seeds, failures, outputs, and the real CLI."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

import rnnlm.tools.compare as cmp
from rnnlm.config import ConfigError
from tests.conftest import ROOT


def test_values_split_outside_brackets():
    assert cmp.split_values("a, b,c") == ["a", "b", "c"]
    assert cmp.split_values("[0.9,0.05,0.05],[0.8,0.1,0.1]") == ["[0.9,0.05,0.05]",
                                                                 "[0.8,0.1,0.1]"]
    assert cmp.split_values("'x,y',z") == ["'x,y'", "z"]


def test_variants_are_the_product_with_readable_names():
    variants = cmp.make_variants(["data.iterator=sequential,random",
                                  "model.kind=lstm,gru,rnn"])
    assert len(variants) == 6
    assert variants[0].name == "iterator-sequential_kind-lstm"
    assert variants[-1].overrides == ["data.iterator=random", "model.kind=rnn"]
    same_tail = cmp.make_variants(["model.dropout=0.1,0.2", "train.dropout=0.3"])
    assert same_tail[0].name == "model.dropout-0.1_train.dropout-0.3"
    assert cmp.make_variants([])[0].name == "base"


@pytest.mark.parametrize("varies, fragment", [
    (["data.iterator"], "must look like key=v1,v2"),
    (["data.iterator=a,,b"], "empty key or value"),
    (["data.iterator=a,a"], "repeats a value"),
    (["data.iterator=a", "data.iterator=b"], "same key twice"),
])
def test_bad_vary_is_a_config_error(varies, fragment):
    with pytest.raises(ConfigError, match=fragment):
        cmp.make_variants(varies)


def test_mean_std():
    assert cmp.mean_std([], 2) == "–"
    assert cmp.mean_std([2.0], 2) == "2.00"
    assert cmp.mean_std([1.0, 3.0], 1) == "2.0 ± 1.4"


def fake_records(train_ppl, val_ppl, wall):
    records = [{"epoch": e + 1, "train_ppl": t, "val_ppl": v, "val_bpc": v / 10,
                "tokens_per_s": 1000.0 * (e + 1), "wall_s": wall * (e + 1)}
               for e, (t, v) in enumerate(zip(train_ppl, val_ppl))]
    return records + [{"event": "test", "test_ppl": 9.0, "test_bpc": 0.9}]


def test_compare_aggregates_seeds_and_reports_failures(tmp_path, monkeypatch):
    """Runs are faked (metrics written by hand): this checks the bookkeeping, not training."""
    calls = []

    def fake_run(config, overrides, timeout, how=()):
        opts = dict(o.split("=", 1) for o in overrides)
        calls.append(opts)
        if opts["data.iterator"] == "random" and opts["seed"] == "1":
            return "exit 1: boom"
        out = Path(opts["out_dir"])
        out.mkdir(parents=True)
        shift = 0.5 * int(opts["seed"])
        recs = fake_records([5 + shift, 4 + shift], [6 + shift, 5.5 + shift], 10)
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        return None

    monkeypatch.setattr(cmp, "run_one", fake_run)
    lines = []
    # A variant whose config is invalid is refused before any run starts (it used to be
    # skipped and reported in the table, the others trained).
    with pytest.raises(ConfigError, match="variant iterator-sequential_kind-nope"):
        cmp.compare(str(ROOT / "configs/tiny.yaml"),
                    ["data.iterator=sequential,random", "model.kind=gru,nope"],
                    seeds=2, sets=[f"out_dir={tmp_path / 'cmp'}"], log=lines.append)
    assert calls == [] and not (tmp_path / "cmp").exists()
    out_dir, results = cmp.compare(str(ROOT / "configs/tiny.yaml"),
                                   ["data.iterator=sequential,random", "model.kind=gru"],
                                   seeds=2, sets=[f"out_dir={tmp_path / 'cmp'}"],
                                   log=lines.append)
    assert out_dir == tmp_path / "cmp"
    assert len(calls) == 4
    assert {c["seed"] for c in calls} == {"0", "1"}
    assert all(c["out_dir"].startswith(str(tmp_path / "cmp")) for c in calls)
    table = (out_dir / "comparison.md").read_text()
    assert "--vary model.kind=gru --seeds 2 --set out_dir=" in table
    row = next(x for x in table.splitlines() if x.startswith("| iterator-sequential_kind-gru"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2/2"
    assert cells[2] == "4.250 ± 0.354"  # final train ppl over seeds 0 and 1: 4 and 4.5
    assert cells[3] == "5.750 ± 0.354"  # best val ppl: 5.5 and 6.0
    random_row = next(x for x in table.splitlines()
                      if x.startswith("| iterator-random_kind-gru"))
    assert "| 1/2 |" in random_row and "4.000 |" in random_row
    assert "iterator-random_kind-gru seed 1 failed: exit 1: boom" in table
    rows = list(csv.DictReader(open(out_dir / "comparison.csv")))
    assert len(rows) == 4 and sum(r["status"] == "ok" for r in rows) == 3
    ok = next(r for r in rows if r["status"] == "ok")
    assert float(ok["best_val_ppl"]) == 5.5 and float(ok["wall_s"]) == 20.0
    assert (out_dir / "comparison.png").stat().st_size > 1000
    assert any("failed (exit 1: boom)" in x for x in lines)


def test_all_variants_invalid_is_a_user_error(tmp_path):
    with pytest.raises(ConfigError, match="model.kind must be one of"):
        cmp.compare(str(ROOT / "configs/tiny.yaml"), ["model.kind=nope,nada"],
                    sets=[f"out_dir={tmp_path}"], log=lambda x: None)


def test_cli_end_to_end(tiny_overrides, tmp_path):
    flat = [a for o in tiny_overrides for a in ("--set", o)]

    def compare(*kinds):
        return subprocess.run(
            [sys.executable, "compare.py", "--config", "configs/tiny.yaml",
             "--vary", f"model.kind={','.join(kinds)}", "--set", "train.epochs=1",
             "--set", "data.max_tokens=600", "--set", "data.split=[0.8,0.1,0.1]", *flat],
            cwd=ROOT, capture_output=True, text=True, timeout=300)

    # an invalid variant: refused in one line before any run (it used to be skipped, exit 0)
    refused = compare("gru", "transformer")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "variant kind-transformer (model.kind=transformer)" in refused.stderr
    run = tmp_path / "run"
    assert not run.exists()
    proc = compare("gru")
    assert proc.returncode == 0, proc.stderr
    assert (run / "kind-gru" / "seed0" / "metrics.jsonl").is_file()
    table = (run / "comparison.md").read_text()
    assert "| kind-gru | 1/1 |" in table
    bad = subprocess.run([sys.executable, "compare.py", "--config", "configs/tiny.yaml",
                          "--vary", "model.kind", *flat], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: --vary")
