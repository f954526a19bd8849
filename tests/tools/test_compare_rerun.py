"""compare.py run again into the same folder (refused, --resume, --overwrite), bad --vary
values, failed runs and cut-off logs: all through the real command."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rnnlm.config import ConfigError
from rnnlm.training.metrics import read_records
from tests.conftest import ROOT


def run_compare(*args, timeout=300):
    return subprocess.run([sys.executable, "compare.py", "--config", "configs/tiny.yaml",
                           "--set", "train.epochs=1", "--set", "data.max_tokens=600", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def flat(tiny_overrides):
    return [a for o in tiny_overrides for a in ("--set", o)]


def one_error_line(proc) -> str:
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def snapshot(folder):
    """Every file under `folder` with its bytes: what a refused or kept rerun must not touch."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_rerun_is_refused_then_resumed_or_started_over(flat, tmp_path):
    vary = ["--vary", "data.iterator=sequential,random"]
    first = run_compare(*vary, *flat)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "run"
    before = snapshot(out)
    assert (out / "comparison.md").is_file()

    # the same command again: refused at once, one line, nothing trained or rewritten
    again = run_compare(*vary, *flat)
    assert again.returncode == 2
    line = one_error_line(again)
    assert "holds an earlier comparison" in line and "--resume" in line and \
        "--overwrite" in line
    assert again.stdout == "" and snapshot(out) == before

    # --resume: finished runs are kept as they are; a missing one is trained
    for name in ("last.pt", "best.pt", "metrics.jsonl", "config.yaml", "perplexity.png"):
        (out / "iterator-random" / "seed0" / name).unlink(missing_ok=True)
    resumed = run_compare(*vary, "--resume", *flat)
    assert resumed.returncode == 0, resumed.stderr
    assert "iterator-sequential seed 0: finished earlier, kept" in resumed.stdout
    assert "iterator-random seed 0: done in" in resumed.stdout
    kept = out / "iterator-sequential" / "seed0"
    assert (kept / "metrics.jsonl").read_bytes() == before[kept.relative_to(out) /
                                                          "metrics.jsonl"]
    assert (out / "iterator-random" / "seed0" / "last.pt").is_file()

    # --resume with more epochs continues every run from its last.pt
    longer = run_compare(*vary, "--resume", *flat, "--set", "train.epochs=2")
    assert longer.returncode == 0, longer.stderr
    assert longer.stdout.count(": continued, done in") == 2
    assert [r["epoch"] for r in read_records(kept)] == [1, 2]

    # --resume under another config is refused before anything trains
    other = run_compare(*vary, "--resume", *flat, "--set", "train.epochs=2",
                        "--set", "train.lr=0.5")
    assert other.returncode == 2
    assert "was trained with train.lr=1.0" in one_error_line(other)

    # --overwrite starts every run over
    over = run_compare(*vary, "--overwrite", *flat)
    assert over.returncode == 0, over.stderr
    assert over.stdout.count(" seed 0: done in") == 2
    assert [r["epoch"] for r in read_records(kept)] == [1]

    both = run_compare(*vary, "--overwrite", "--resume", *flat)
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_a_run_in_which_every_variant_fails_keeps_the_earlier_tables(flat, tmp_path):
    vary = ["--vary", "data.iterator=sequential,random"]
    assert run_compare(*vary, *flat).returncode == 0
    out = tmp_path / "run"
    tables = {name: (out / name).read_bytes()
              for name in ("comparison.md", "comparison.csv", "comparison.png")}
    # every child is stopped long before it trains: all runs fail
    failed = run_compare(*vary, "--overwrite", "--timeout", "0.01", *flat)
    assert failed.returncode == 1
    assert failed.stdout.count("failed (timed out") == 2
    assert "not written (the earlier ones are kept)" in failed.stdout
    assert {name: (out / name).read_bytes() for name in tables} == tables


def test_a_bad_vary_value_is_refused_before_any_run(flat, tmp_path):
    proc = run_compare("--vary", "data.iterator=sequential,bogus", *flat)
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "iterator-bogus" in line and "'bogus'" in line and "data.iterator" in line
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_a_failed_run_makes_the_exit_code_non_zero(flat, tmp_path):
    # a valid config whose text is too short for one batch: found by the run, not the check
    proc = run_compare("--vary", "data.num_steps=10,700", *flat)
    assert proc.returncode == 1, proc.stderr
    table = (tmp_path / "run" / "comparison.md").read_text()
    assert "| num-steps-10 | 1/1 |" in table and "| num-steps-700 | 0/1 |" in table
    assert "num-steps-700 seed 0 failed: exit 2" in table


def test_a_log_cut_off_by_a_killed_run_is_read_without_its_last_line(flat, tmp_path):
    assert run_compare(*flat).returncode == 0
    log = tmp_path / "run" / "base" / "seed0" / "metrics.jsonl"
    whole = log.read_text()
    log.write_text(whole + '{"epoch": 2, "step": 300, "train_lo')  # killed mid-line
    assert read_records(log.parent) == [json.loads(x) for x in whole.splitlines()]
    proc = run_compare("--resume", *flat)
    assert proc.returncode == 0, proc.stderr
    assert "base seed 0: finished earlier, kept" in proc.stdout
    log.write_text('{"epoch": 1, "trai\n' + whole)  # damage elsewhere is an error, not a guess
    with pytest.raises(ConfigError, match="line 1 is not a JSON record"):
        read_records(log.parent)


def test_ctrl_c_saves_the_run_in_progress_and_resume_continues_it(flat, tmp_path):
    """Ctrl-C reaches compare and its child (one process group, as from a terminal): the
    child saves last.pt, compare says how to continue, and --resume does."""
    args = [sys.executable, "compare.py", "--config", "configs/tiny.yaml", "--set",
            "train.epochs=100", "--set", "data.max_tokens=600", *flat]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    log = tmp_path / "run" / "base" / "seed0" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.strip().endswith(" --resume") and "continue with: " in err
    assert not (tmp_path / "run" / "comparison.md").exists()
    assert (log.parent / "last.pt").is_file()
    # continued to two epochs past where it stopped (not all 100, to keep the test short)
    done = len([r for r in read_records(log.parent) if "epoch" in r])
    resumed = subprocess.run([*args, "--set", f"train.epochs={done + 2}", "--resume"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "base seed 0: continued, done in" in resumed.stdout
    assert [r["epoch"] for r in read_records(log.parent) if "epoch" in r] == \
        list(range(1, done + 3))


def test_a_timed_out_run_is_saved_and_resume_continues_it(flat, tmp_path):
    timed_out = run_compare("--set", "train.epochs=1000", "--timeout", "6", *flat)
    assert timed_out.returncode == 1 and "failed (timed out after 6 s)" in timed_out.stdout
    folder = tmp_path / "run" / "base" / "seed0"
    assert (folder / "last.pt").is_file()  # SIGTERM: the run finished its batch and saved
    done = len(read_records(folder))
    assert done < 1000
    # continued (to two epochs more than it had finished, to keep the test short)
    resumed = run_compare("--set", f"train.epochs={done + 2}", "--resume", *flat)
    assert resumed.returncode == 0, resumed.stderr
    assert "base seed 0: continued, done in" in resumed.stdout
    assert [r["epoch"] for r in read_records(folder)] == list(range(1, done + 3))
