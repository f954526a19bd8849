"""bench speedrun: the records tailed while a child writes them, the time to target and the
epoch, "not reached", the rounds in turns, the ratios within rounds, failures, the real CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rnnlm.tools import speedrun as sr
from tests.conftest import ROOT


def record(epoch, val_ppl, tokens_per_s=1000.0):
    return {"epoch": epoch, "train_ppl": 9.0, "val_ppl": val_ppl, "tokens_per_s": tokens_per_s}


def test_the_tail_reads_complete_lines_only_each_stamped_when_first_seen(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = sr.MetricsTail(path)
    assert tail.poll(0.1) == []  # not written yet
    path.write_bytes(b"")
    first, second = json.dumps(record(1, 9.0)), json.dumps(record(2, 5.0))
    with open(path, "ab") as f:
        f.write(first.encode() + b"\n" + second[:10].encode())  # the second cut mid-line
    assert tail.poll(0.2) == [(0.2, record(1, 9.0))]
    with open(path, "ab") as f:
        f.write(second[10:].encode())
    assert tail.poll(0.3) == []  # still no newline: not complete
    with open(path, "ab") as f:
        f.write(b"\n\n")
    assert tail.poll(0.4) == [(0.4, record(2, 5.0))]
    assert tail.stamped == [(0.2, record(1, 9.0)), (0.4, record(2, 5.0))]


def test_the_first_record_at_or_under_the_target_gives_the_time_and_epoch():
    stamped = [(2.0, record(1, 8.0, 100.0)), (3.0, {**record(2, None), "tokens_per_s": 300.0}),
               (4.0, record(3, 3.6, 200.0)), (5.0, record(4, 3.5, 900.0)),
               (6.0, {"event": "test", "weights_epoch": 4, "test_ppl": 3.7})]
    got = sr.summarise(stamped, target=3.6)
    assert got == {"reached_s": 4.0, "reached_epoch": 3, "tokens_per_s": 250.0,
                   "best_val_ppl": 3.5, "best_epoch": 4, "test_ppl": 3.7, "epochs": 4}
    never = sr.summarise(stamped, target=3.0)
    assert never["reached_s"] is None and never["reached_epoch"] is None
    assert never["best_val_ppl"] == 3.5  # the rest of the figures are there all the same
    assert sr.summarise([], 3.6)["tokens_per_s"] is None


def test_rounds_alternate_the_order():
    assert sr.round_order(["a", "b"], 3) == [["a", "b"], ["b", "a"], ["a", "b"]]
    assert sr.round_order(["a", "b", "c"], 2) == [["a", "b", "c"], ["c", "b", "a"]]
    assert sr.unique_names(["x/a.yaml", "y/a.yaml", "b.yaml"]) == ["a", "a-2", "b"]


def timing(recipe, round_no, reached=None, wall=10.0, error=None, epoch=2):
    return sr.Timing(recipe, round_no, Path("/nowhere"), wall_s=wall, reached_s=reached,
                     reached_epoch=epoch if reached else None, tokens_per_s=1000.0,
                     best_val_ppl=3.5, test_ppl=3.55, epochs=4, error=error)


def row(text, name):
    line = next(x for x in text.splitlines() if x.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_the_report_takes_ratios_within_rounds_and_says_not_reached():
    recipes = [sr.Recipe("base", "base.yaml", 2e6), sr.Recipe("fast", "fast.yaml"),
               sr.Recipe("never", "never.yaml"), sr.Recipe("broken", "broken.yaml")]
    timings = [timing("base", 1, 10.0), timing("fast", 1, 3.0), timing("never", 1),
               timing("broken", 1, error="exit 3: error: training diverged"),
               timing("base", 2, 40.0), timing("fast", 2, 4.0), timing("never", 2),
               timing("broken", 2, error="exit 3: error: training diverged"),
               timing("base", 3, 20.0), timing("fast", 3, 10.0, wall=12.0), timing("never", 3),
               timing("broken", 3, error="exit 3: error: training diverged")]
    text = sr.report(recipes, timings, 3.6, 3, "a machine", "rnnlm bench speedrun x")
    assert text.startswith("Machine: a machine.\nCommand: `rnnlm bench speedrun x` (")
    assert row(text, "base") == ["base", "20.0 s (10.0-40.0)", "2", "1,000", "2.0", "3.500",
                                 "3.550", "10.0 s (10.0-10.0)"]
    assert row(text, "fast")[1] == "4.0 s (3.0-10.0)" and row(text, "fast")[4] == "n/a"
    assert row(text, "fast")[-1] == "10.0 s (10.0-12.0)"
    assert row(text, "never")[1:3] == ["not reached", "–"]
    assert row(text, "broken")[1] == "failed"
    # the ratios within rounds, 0.3, 0.1 and 0.5: their median, not the medians' ratio (0.2)
    assert "fast: 0.30x the time of base (rounds: 0.10-0.50)" in text
    assert "never: no round in which both it and base reached the target" in text
    assert "- broken round 2 failed: exit 3: error: training diverged" in text
    partial = sr.report(recipes[:2], [timing("base", 1, 10.0), timing("fast", 1, 3.0),
                                      timing("base", 2, 10.0), timing("fast", 2)],
                        3.6, 2, "m", "c")
    assert row(partial, "fast")[1] == "3.0 s, reached in 1 of 2 rounds"


def test_speedrun_runs_the_recipes_in_turns_and_fails_at_the_end(monkeypatch, tmp_path,
                                                                 capsys):
    order = []

    def fake_time_run(recipe, round_no, out_dir, sets, target, budget=None):
        order.append((round_no, recipe.name, out_dir.name, tuple(sets), target))
        failed = recipe.name == "b" and round_no == 2
        return timing(recipe.name, round_no, None if failed else 5.0,
                      error="exit 3: error: diverged" if failed else None)

    monkeypatch.setattr(sr, "prepare", lambda configs, sets, root: [
        sr.Recipe(name, config) for name, config in zip(sr.unique_names(configs), configs)])
    monkeypatch.setattr(sr, "time_run", fake_time_run)
    code = sr.speedrun(["x/a.yaml", "b.yaml"], 3.6, 3, ["train.threads=1"], str(tmp_path / "k"),
                       "rnnlm bench speedrun x/a.yaml b.yaml --rounds 3")
    assert code == 1  # a failed run is not a success, and the others went on
    assert [(r, name, folder) for r, name, folder, _, _ in order] == [
        (1, "a", "a-round1"), (1, "b", "b-round1"), (2, "b", "b-round2"),
        (2, "a", "a-round2"), (3, "a", "a-round3"), (3, "b", "b-round3")]
    assert all(sets == ("train.threads=1",) and target == 3.6 for *_, sets, target in order)
    out, err = capsys.readouterr()
    assert "[3/6] round 2: b: failed (exit 3: error: diverged)" in err
    assert "b: 1.00x the time of a" in out
    # the folders a kept run would use are refused when they hold anything
    (tmp_path / "k" / "a-round1").mkdir(parents=True, exist_ok=True)
    with pytest.raises(sr.ConfigError, match="already holds a-round1"):
        sr.speedrun(["x/a.yaml", "b.yaml"], 3.6, 1, [], str(tmp_path / "k"), "c")


@pytest.fixture
def tiny_config(tmp_path, data_dir):
    """heldout_lstm_spaced cut down to seconds: 20,000 tokens, one LSTM layer of 32, 2
    epochs, on the test's own copy of the text; make(name, **train) writes a variant."""

    def make(name, **train):
        cfg = yaml.safe_load((ROOT / "configs" / "heldout_lstm_spaced.yaml").read_text())
        cfg["device"] = "cpu"
        cfg["data"].update(max_tokens=20000, data_dir=str(data_dir))
        cfg["model"].update(hidden_size=32, num_layers=1)
        cfg["train"].update({"epochs": 2, "predict_every": 0, "threads": 1, **train})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return make


def speedrun_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "rnnlm", "bench", "speedrun", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_real_runs_reached_and_not_reached(tiny_config, tmp_path):
    """Two real training commands: one reaches the target in its first epoch, the other
    (a learning rate too small to learn anything) never does; the report says which, and
    what it says agrees with the kept metrics.jsonl."""
    learns = tiny_config("learns")
    stuck = tiny_config("stuck", lr=1e-7, lr_min=1e-8)
    page = tmp_path / "speed.md"
    page.write_text("# Speed\n\nprose that must survive\n")
    proc = speedrun_cli(learns, stuck, "--target", 20, "--keep", tmp_path / "kept",
                        "--write", page)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("Machine: ") and "torch " in out.splitlines()[0]
    assert f"Command: `python -m rnnlm bench speedrun {learns} {stuck} --target 20" in out
    reached = row(out, "learns")
    records = [json.loads(line) for line in
               (tmp_path / "kept" / "learns-round1" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r.get("val_ppl") is not None and r["val_ppl"] <= 20)
    assert reached[2] == str(first["epoch"]) == "1"
    to_target, whole = float(reached[1].split()[0]), float(reached[-1].split()[0])
    assert 0 < to_target < whole  # the run went on: a second epoch and the test split
    assert reached[5] == f"{min(r['val_ppl'] for r in records if 'val_ppl' in r):.3f}"
    assert reached[6] == f"{records[-1]['test_ppl']:.3f}"
    assert float(reached[4]) > 0  # GFLOP/s
    assert row(out, "stuck")[1] == "not reached"
    assert "stuck: no round in which both it and learns reached the target" in out
    assert "[1/2] round 1: learns: val ppl <= 20 after" in proc.stderr
    assert "[2/2] round 1: stuck: val ppl <= 20 not reached; whole run" in proc.stderr
    text = page.read_text()
    assert "prose that must survive" in text and "<!-- bench:speedrun:start -->" in text
    assert "| learns |" in text


def test_a_failing_run_is_one_line_and_a_non_zero_exit(tiny_config):
    diverges = tiny_config("diverges", optimizer="sgd", lr=1e30, clip_norm=None, epochs=1)
    proc = speedrun_cli(diverges, "--target", 20)
    assert proc.returncode == 1
    failure = [line for line in proc.stderr.splitlines() if "failed" in line]
    assert failure == [failure[0]] and "diverges: failed (exit 3: error: training diverged" \
        in failure[0]
    assert row(proc.stdout, "diverges")[1] == "failed"


@pytest.mark.parametrize("args, fragment", [
    (["configs/nope.yaml"], "error: config file configs/nope.yaml not found"),
    (["configs/tiny.yaml", "--set", "out_dir=x"], "error: --set out_dir=... is not for"),
    (["configs/tiny.yaml", "--rounds", "0"], "error: --rounds must be >= 1"),
])
def test_a_config_that_cannot_run_is_refused_before_any_run(args, fragment):
    proc = speedrun_cli(*args, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(fragment), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_options_of_the_preset_benchmark_before_speedrun_are_refused():
    """argparse would let speedrun's defaults replace them without a word."""
    proc = subprocess.run([sys.executable, "bench.py", "--rounds", "5", "speedrun"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: --rounds 5: the preset benchmark's options do not "
                                   "apply to speedrun; give speedrun's options after it")


# ---------------------------------------------------------------------------- --budget


def test_within_a_budget_only_the_records_stamped_before_it_count():
    stamped = [(2.0, record(1, 8.0, 100.0)), (4.0, record(2, 3.7, 300.0)),
               (6.0, record(3, 3.5, 900.0)),  # after the budget: the run was being stopped
               (7.0, {"event": "test", "weights_epoch": 3, "test_ppl": 3.4})]
    got = sr.summarise(stamped, target=3.6, budget=5.0)
    assert got == {"reached_s": None, "reached_epoch": None, "tokens_per_s": 200.0,
                   "best_val_ppl": 3.7, "best_epoch": 2, "test_ppl": None, "epochs": 2}
    # the trainer's test scored the best weights within the budget: it is theirs
    tested = [*stamped[:2], (4.5, {"event": "test", "weights_epoch": 2, "test_ppl": 3.9})]
    assert sr.summarise(tested, 3.6, budget=5.0)["test_ppl"] == 3.9
    # without a budget everything counts, as before
    assert sr.summarise(stamped, 3.6)["best_val_ppl"] == 3.5
    assert sr.summarise(stamped, 3.6)["test_ppl"] == 3.4


def test_the_budget_report_gives_epochs_best_val_test_and_how_each_run_ended():
    recipes = [sr.Recipe("lstm", "lstm.yaml", 2e6), sr.Recipe("lru", "lru.yaml")]
    stopped = sr.Timing("lru", 1, Path("/nowhere"), wall_s=61.0, tokens_per_s=500.0,
                        best_val_ppl=3.8, best_epoch=3, test_ppl=None, epochs=3,
                        stopped_s=60.1)
    ended = sr.Timing("lstm", 1, Path("/nowhere"), wall_s=40.0, reached_s=30.0,
                      reached_epoch=2, tokens_per_s=1000.0, best_val_ppl=3.5, best_epoch=2,
                      test_ppl=3.6, epochs=2)
    text = sr.report(recipes, [ended, stopped], 3.6, 1, "m", "c --budget 60", budget=60.0)
    assert "| recipe | epochs within 60 s | best val ppl | at epoch | test ppl |" in text
    assert row(text, "lstm") == ["lstm", "2", "3.500", "2", "3.600", "1,000", "2.0", "30.0 s",
                                 "by itself at 40.0 s"]
    assert row(text, "lru") == ["lru", "3", "3.800", "3", "n/a", "500", "n/a", "not reached",
                                "stopped at 60.1 s"]


def test_a_real_run_is_stopped_at_the_budget_and_scored_on_its_best_weights(tiny_config,
                                                                             tmp_path):
    """A run of many epochs and a budget of a few seconds: it is stopped (not a failure),
    counts only the epochs before the budget, and its test perplexity is that of best.pt,
    which holds the best validation within the budget."""
    long = tiny_config("long", epochs=200, checkpoint_every=0)
    proc = speedrun_cli(long, "--target", 1.01, "--budget", 12, "--keep", tmp_path / "kept")
    assert proc.returncode == 0, proc.stderr
    cells = row(proc.stdout, "long")
    assert cells[-1].startswith("stopped at ")
    stopped_at = float(cells[-1].split()[2])
    assert 12 <= stopped_at < 13
    records = [json.loads(line) for line in
               (tmp_path / "kept" / "long-round1" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r.get("val_ppl") is not None]
    assert 1 <= int(cells[1]) <= len(epochs) < 200  # stopped long before its end
    assert not any(r.get("event") == "test" for r in records)  # the trainer never got there
    within = epochs[:int(cells[1])]
    best = min(within, key=lambda r: r["val_ppl"])
    assert cells[2:4] == [f"{best['val_ppl']:.3f}", str(best["epoch"])]
    # scored from best.pt after the stop; n/a only when an epoch that ended while the child
    # was stopping wrote a better best.pt (the weights of the best within the budget are gone)
    saved = torch.load(tmp_path / "kept" / "long-round1" / "best.pt", weights_only=False)
    if saved["progress"]["epoch"] == best["epoch"]:
        assert 1 < float(cells[4]) < 40
    else:
        assert cells[4] == "n/a" and saved["progress"]["epoch"] > best["epoch"]


def test_best_pt_is_scored_as_the_trainer_scores_its_test_split(tiny_config, tmp_path):
    """budget_test on a finished run's best.pt gives the trainer's own test perplexity (the
    same averaged weights, lanes and split), and nothing for another epoch's weights."""
    from rnnlm.training.run import train

    path = tiny_config("ema", ema_decay=0.9)
    train(sr.load_config(path, [f"out_dir={tmp_path / 'run'}"]), quiet=True)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    test = next(r for r in records if r.get("event") == "test")
    got = sr.budget_test(tmp_path / "run" / "best.pt", test["weights_epoch"])
    assert got == pytest.approx(test["test_ppl"], rel=1e-6)
    assert sr.budget_test(tmp_path / "run" / "best.pt", test["weights_epoch"] + 1) is None
    assert sr.budget_test(tmp_path / "nowhere.pt", 1) is None


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_a_bad_budget_is_one_line_and_exit_code_2(value):
    proc = speedrun_cli("configs/tiny.yaml", f"--budget={value}", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: --budget must be a number of seconds > 0, got " \
                                  f"{float(value)}"


def test_no_flops_are_claimed_for_the_linear_recurrences():
    """flops_per_token counts a W_hh cell's products: a figure for an LRU would be invented."""
    cfg = sr.load_config(ROOT / "configs" / "lru.yaml", [])
    assert sr.model_flops(cfg, 28) is None
    assert sr.model_flops(sr.load_config(ROOT / "configs" / "heldout_lstm_spaced.yaml", []),
                          28) > 0


def test_rdrop_counts_each_token_twice():
    """train.rdrop runs every lane twice: the same tokens/s is twice the matmul work."""
    once = sr.load_config(ROOT / "configs" / "speedrun.yaml", [])
    twice = sr.load_config(ROOT / "configs" / "speedrun.yaml", ["train.rdrop=1"])
    assert sr.model_flops(twice, 28) == 2 * sr.model_flops(once, 28)
