"""Divergence is never silent: a NaN or infinite loss, gradient norm or weight stops training
with one line and its own exit code, keeps the last good checkpoint, and never reaches
metrics.jsonl; non-finite config floats are refused at load; huge perplexities print compactly.
"""

import functools
import json
import math
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from rnnlm.config import ConfigError, config_from_dict
from rnnlm.models import build_model
from rnnlm.training import divergence
from rnnlm.training import epoch as epoch_module
from rnnlm.training.divergence import (
    DIVERGED_EXIT_CODE,
    DivergenceWatch,
    TrainingDiverged,
    check_weights_before_saving,
)
from rnnlm.training.epoch import format_ppl, train_epoch
from rnnlm.training.metrics import MetricsLog
from rnnlm.training.step import forward_backward
from tests.conftest import ROOT

# A learning rate that takes the weights to float32's limit in one step: the next loss is
# infinite (tiny.yaml's first batch has a finite loss, the second does not).
DIVERGING = ["train.lr=1e38", "train.clip_norm=null"]


def train_cli(*args, overrides=()):
    flat = [a for o in overrides for a in ("--set", o)]
    return subprocess.run([sys.executable, "train.py", *args, *flat, "--quiet"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def strict_json(line: str):
    """json.loads refusing NaN and Infinity, which Python's reader alone accepts."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(line, parse_constant=refuse)


def read_strict(path):
    return [strict_json(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_one_divergence_line(stderr: str, epoch: int, batch: int):
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith(f"error: training diverged in epoch {epoch} at batch {batch}: "), line
    assert "last finite loss" in line and f"at batch {batch - 1}" in line, line
    assert "train.lr" in line and "train.clip_norm" in line, line
    return line


# ------------------------------------------------------------------ through the real command


def test_divergence_stops_with_its_exit_code_and_keeps_the_last_checkpoint(tiny_overrides,
                                                                              tmp_path):
    good = train_cli("--config", "configs/tiny.yaml", overrides=tiny_overrides)
    assert good.returncode == 0, good.stderr
    run = tmp_path / "run"
    before = {name: (run / name).read_bytes() for name in ("last.pt", "best.pt",
                                                          "metrics.jsonl")}

    proc = train_cli("--resume", str(run / "last.pt"),
                     overrides=[*DIVERGING, "train.epochs=4"])
    assert proc.returncode == DIVERGED_EXIT_CODE, proc.stderr
    line = assert_one_divergence_line(proc.stderr, epoch=3, batch=2)
    assert str(run / "last.pt") in line
    after = {name: (run / name).read_bytes() for name in before}
    assert after == before  # the checkpoints bit for bit, and no record of the diverged epoch
    records = read_strict(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]


def test_divergence_in_a_new_run_saves_nothing(tiny_overrides, tmp_path):
    proc = train_cli("--config", "configs/tiny.yaml", overrides=[*tiny_overrides, *DIVERGING])
    assert proc.returncode == DIVERGED_EXIT_CODE, proc.stderr
    line = assert_one_divergence_line(proc.stderr, epoch=1, batch=2)
    assert "no checkpoint had been written yet" in line
    run = tmp_path / "run"
    assert not (run / "last.pt").exists() and not (run / "best.pt").exists()
    assert read_strict(run / "metrics.jsonl") == []


def test_the_exit_code_is_its_own_and_documented():
    assert DIVERGED_EXIT_CODE not in (0, 1, 2, 130, 143)
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert f"{DIVERGED_EXIT_CODE} when training diverged" in " ".join(proc.stdout.split())
    docs = (ROOT / "docs" / "checkpoints.md").read_text(encoding="utf-8")
    assert f"exits with {DIVERGED_EXIT_CODE}" in docs


@pytest.mark.parametrize("value", ["inf", "nan", ".inf", "-.inf", ".nan", "1e400"])
def test_non_finite_learning_rate_is_refused_at_load(value, tiny_overrides):
    with pytest.raises(ConfigError, match=r"train\.lr must be a finite number"):
        config_from_dict({}, [f"train.lr={value}"])


@pytest.mark.parametrize("override, key", [
    ("train.clip_norm=inf", "train.clip_norm"),  # float | None
    ("train.ema_decay=nan", "train.ema_decay"),
    ("model.dropout=nan", "model.dropout"),
    ("data.split=[0.8, .nan, 0.1]", r"data.split\[1\]"),  # list[float] | None
])
def test_every_config_float_must_be_finite(override, key):
    with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
        config_from_dict({}, [override])


def test_non_finite_yaml_value_is_refused_by_the_command(tmp_path, tiny_overrides):
    config = tmp_path / "inf.yaml"
    config.write_text((ROOT / "configs/tiny.yaml").read_text() + "  weight_decay: .inf\n")
    proc = train_cli("--config", str(config), overrides=tiny_overrides)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "train.weight_decay must be a finite number" in proc.stderr
    proc = train_cli("--config", "configs/tiny.yaml", overrides=[*tiny_overrides,
                                                                 "train.lr=inf"])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "train.lr must be a finite number, got inf" in proc.stderr


def test_a_learning_rate_past_float32_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"train\.lr must be at most 3.4e\+38"):
        config_from_dict({}, ["train.lr=1e300"])
    # Adam's first step divides the lr by 0.1: a tenth of float32's range is its limit
    for optimizer in ("adam", "adamw"):
        with pytest.raises(ConfigError, match=rf"at most 3.4e\+37 \(a tenth of the largest "
                                              rf"float32, for {optimizer}\)"):
            config_from_dict({}, [f"train.optimizer={optimizer}", "train.lr=1e38"])
    config_from_dict({}, ["train.optimizer=adam", "train.lr=3e37"])


def test_huge_perplexity_prints_compactly(tiny_overrides, tmp_path):
    """lr=1e6 without clipping: the loss stays finite but its perplexity is past exp(700)."""
    flat = [a for o in [*tiny_overrides, "train.lr=1e6", "train.clip_norm=null",
                        "train.epochs=2"] for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.yaml", *flat],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not re.search(r"\d{12}", proc.stdout), proc.stdout
    lines = proc.stdout.splitlines()
    assert any(line.startswith("epoch    1  ppl  >1e+304  grad") for line in lines), lines
    assert lines[-1].startswith("perplexity >1e+304, "), lines[-1]
    records = read_strict(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["train_ppl"] == pytest.approx(math.exp(700))  # the log is unchanged


def test_format_ppl_keeps_healthy_numbers_and_shortens_huge_ones():
    for value in (1.0, 9.165768, 27.99, 1234.5678, 999999.4):
        assert f"{format_ppl(value):>8}" == f"{value:8.3f}"
        assert format_ppl(value, 1) == f"{value:.1f}"
        assert format_ppl(value, 2) == f"{value:.2f}"
    assert f"{format_ppl(math.nan):>8}" == f"{math.nan:8.3f}"
    assert format_ppl(1.234e8) == "1.23e+08"
    assert format_ppl(2.5e299) == "2.5e+299"
    assert format_ppl(math.exp(700)) == format_ppl(math.inf) == ">1e+304"


# ------------------------------------------------------------------ metrics.jsonl


def test_metrics_log_writes_null_for_non_finite_numbers(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"epoch": 1, "train_loss": math.nan, "train_ppl": math.inf,
               "grad_norm": -math.inf, "lr": 0.5, "tokens": 7,
               "diagnostics": {"norms": [1.0, math.nan], "eig": (math.inf, 2)}})
    (record,) = read_strict(tmp_path / "metrics.jsonl")
    assert record == {"epoch": 1, "train_loss": None, "train_ppl": None, "grad_norm": None,
                      "lr": 0.5, "tokens": 7,
                      "diagnostics": {"norms": [1.0, None], "eig": [None, 2]}}


# ------------------------------------------------------------------ train_epoch and the watch


def tiny_setup(lr=0.5, batches=10):
    torch.manual_seed(0)
    cfg = config_from_dict({}, ["model.hidden_size=8"])
    model = build_model(cfg.model, 12)
    data = [(torch.randint(0, 12, (2, 5)), torch.randint(0, 12, (2, 5)))
            for _ in range(batches)]
    return model, data, torch.optim.SGD(model.parameters(), lr=lr)


def spoiled_at(batch: int, how: str):
    """A batch step whose `batch`-th call (from 1) returns a NaN loss or leaves an infinite
    gradient, as a diverging run's would."""
    calls = [0]

    def step(model, X, Y, state, xi=None):
        calls[0] += 1
        loss, state = forward_backward(model, X, Y, state, xi)
        if calls[0] == batch:
            if how == "loss":
                loss = loss * math.nan
            else:
                next(model.parameters()).grad.fill_(math.inf)
        return loss, state
    return step


@pytest.mark.parametrize("how, problem", [("loss", "the loss is nan"),
                                          ("grad", "the gradient norm is inf")])
def test_train_epoch_stops_at_the_first_non_finite_batch(how, problem):
    model, data, opt = tiny_setup()
    with pytest.raises(TrainingDiverged) as caught:
        train_epoch(model, data, opt, None, True, torch.device("cpu"),
                    step=spoiled_at(4, how), epoch=2)
    diverged = caught.value
    assert (diverged.epoch, diverged.batch, diverged.last_batch) == (3, 4, 3)
    assert problem in str(diverged) and math.isfinite(diverged.last_loss)
    assert diverged.exit_code == DIVERGED_EXIT_CODE


@pytest.mark.parametrize("bad, looked_at", [(6, 8), (10, 10)])
def test_the_windowed_watch_finds_the_exact_batch(bad, looked_at, monkeypatch):
    """The GPU's way (a window read every few batches), run on the CPU: the run stops at the
    next look, or at the end of the epoch, and still names the first bad batch."""
    seen = []
    monkeypatch.setattr(epoch_module, "DivergenceWatch",
                        functools.partial(DivergenceWatch, every=4))
    model, data, opt = tiny_setup()
    step = spoiled_at(bad, "loss")

    def counting(*args, **kwargs):
        seen.append(1)
        return step(*args, **kwargs)
    with pytest.raises(TrainingDiverged) as caught:
        train_epoch(model, data, opt, 1.0, True, torch.device("cpu"), step=counting)
    assert len(seen) == looked_at  # batches run before the look that found it
    assert (caught.value.batch, caught.value.last_batch) == (bad, bad - 1)


def test_the_watch_reads_the_device_only_every_few_batches(monkeypatch):
    watch = DivergenceWatch(torch.device("cpu"), 0, every=4)
    looks = []
    monkeypatch.setattr(watch, "judge", lambda numbers: looks.append(len(numbers)))
    for _ in range(10):
        watch.after_batch(torch.tensor(1.0), torch.tensor(2.0))
    watch.end_of_epoch([torch.ones(3)])
    assert looks == [4, 4, 2]


def test_weights_made_non_finite_by_the_last_step_are_caught():
    """An infinite learning rate: every loss and gradient is finite, the weights are not."""
    model, data, _ = tiny_setup(batches=1)
    opt = torch.optim.SGD(model.parameters(), lr=math.inf)
    with pytest.raises(TrainingDiverged, match="the weights are not finite") as caught:
        train_epoch(model, data, opt, 1.0, True, torch.device("cpu"))
    assert caught.value.batch is None and caught.value.last_batch == 1


def test_non_finite_weights_are_never_saved():
    model, _, _ = tiny_setup()
    average = build_model(config_from_dict({}, ["model.hidden_size=8"]).model, 12)
    check_weights_before_saving([model, average, None], 3, None)  # finite: nothing to say
    with torch.no_grad():
        next(average.parameters())[0] = math.nan
    with pytest.raises(TrainingDiverged, match="weights to be saved are not finite"):
        check_weights_before_saving([model, average], 3, 7)


def test_the_notebook_api_raises_training_diverged(tiny_overrides):
    import rnnlm

    with pytest.raises(TrainingDiverged) as caught:
        rnnlm.train(ROOT / "configs/tiny.yaml", overrides=[*tiny_overrides, *DIVERGING],
                    quiet=True)
    message = str(caught.value)
    assert message.startswith("training diverged in epoch 1 at batch 2: the loss is inf")
    assert divergence.HINT in message and "\n" not in message


# ------------------------------------------------------------------ DDP and CUDA


@pytest.mark.xdist_group("torchrun")  # one torchrun job at a time (tests/conftest.py)
def test_every_rank_stops_with_the_exit_code_under_torchrun(tiny_overrides, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    flat = [a for o in [*tiny_overrides, *DIVERGING, "train.threads=1"] for a in ("--set", o)]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "train.py", "--config", "configs/tiny.yaml", *flat, "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode != 0
    # one line from rank 0; both workers left with the code (torchrun's report lists them)
    assert proc.stderr.count("error: training diverged in epoch 1 at batch ") == 1, proc.stderr
    assert len(re.findall(rf"exitcode\s*: {DIVERGED_EXIT_CODE} ", proc.stderr)) == 2, \
        proc.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_the_watch_does_not_wait_for_the_gpu_between_looks():
    device = torch.device("cuda")
    watch = DivergenceWatch(device, 0)
    assert watch.every == divergence.CHECK_EVERY > 1
    loss, norm = torch.tensor(2.0, device=device), torch.tensor(1.0, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(divergence.CHECK_EVERY - 1):
                watch.after_batch(loss, norm)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not [w for w in caught if "synchroniz" in str(w.message)]


@cuda
def test_train_epoch_on_cuda_names_the_first_bad_batch():
    model, data, _ = tiny_setup(batches=40)
    model = model.cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with pytest.raises(TrainingDiverged) as caught:
        train_epoch(model, data, opt, 1.0, True, torch.device("cuda"),
                    step=spoiled_at(3, "loss"))
    assert (caught.value.batch, caught.value.last_batch) == (3, 2)
