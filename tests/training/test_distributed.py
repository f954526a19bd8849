"""Data-parallel training: torchrun with 2 gloo processes must reproduce 1 process."""

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from rnnlm.config import ConfigError, checks, load_config
from rnnlm.models import MODEL_KINDS, build_model
from rnnlm.training import distributed
from rnnlm.training.run import train
from tests.conftest import ROOT

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def read_metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def single_process_env():
    """The test process' environment without any torchrun variables it may have inherited."""
    return {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


# clip_norm 0.2 makes clipping bite in some batches, so equal grad norms and clipped
# fractions show that every rank clipped the same (global, averaged) gradient.
EQUIVALENCE_CASES = {
    "sequential": ["data.iterator=sequential", "model.kind=rnn_scratch"],
    "random": ["data.iterator=random", "model.kind=lstm"],
    # every rank draws the same xi (window lengths: test_iterators); diagnostics on rank 0
    "randomized": ["model.kind=gru_scratch", "train.truncation=randomized",
                   "train.diagnostics=true"],
}


@pytest.mark.xdist_group("torchrun")  # one torchrun job at a time (tests/conftest.py)
@pytest.mark.parametrize("iterator", list(EQUIVALENCE_CASES))
def test_two_processes_match_one(iterator, data_dir, tmp_path, monkeypatch):
    overrides = [f"data.data_dir={data_dir}", "train.epochs=3", "train.threads=1",
                 "train.clip_norm=0.2", "train.predict_every=1", *EQUIVALENCE_CASES[iterator]]
    flat = [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run(
        [*TORCHRUN, "--nproc_per_node=2", "train.py", "--config", "configs/tiny.yaml", *flat,
         "--set", f"out_dir={tmp_path / 'ddp'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=single_process_env())
    assert proc.returncode == 0, proc.stderr[-3000:]

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(ROOT / "configs/tiny.yaml", [*overrides, f"out_dir={tmp_path / 'one'}"])
    train(cfg, quiet=True)

    ddp, one = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "one")
    assert [r["epoch"] for r in ddp] == [r["epoch"] for r in one] == [1, 2, 3]
    assert any(r["clipped_frac"] > 0 for r in one)
    for a, b in zip(ddp, one):
        assert a["step"] == b["step"] and a["tokens"] == b["tokens"]  # global, not per rank
        assert a["clipped_frac"] == b["clipped_frac"]
        for key in ("train_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a["epoch"])
    # Only rank 0 talks: one header, one line per epoch prediction, one final summary.
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("perplexity ") for line in lines) == 1
    assert sum("2 processes (DDP)" in line for line in lines) == 1
    assert sum(line.startswith("epoch    1 ") for line in lines) == 1


def test_indivisible_batch_is_a_clear_error(tiny_overrides):
    env = {**single_process_env(), "RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}
    flat = [a for o in tiny_overrides for a in ("--set", o)]
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/tiny.yaml", *flat],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "data.batch_size=4 is not divisible by the 3 processes" in proc.stderr


def test_context_from_env():
    assert distributed.context_from_env({}) == distributed.DistContext(0, 1, 0)
    ctx = distributed.context_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.enabled, ctx.is_main) == (
        3, 4, 1, True, False)
    with pytest.raises(ConfigError, match="WORLD_SIZE='two' must be an integer"):
        distributed.context_from_env({"WORLD_SIZE": "two"})
    with pytest.raises(ConfigError, match="RANK=4 / WORLD_SIZE=4 are inconsistent"):
        distributed.context_from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_batch_size_must_split_evenly():
    checks.check_batch_size(32, distributed.DistContext(0, 4, 0).world_size)
    with pytest.raises(ConfigError, match="choose a multiple of 3"):
        checks.check_batch_size(32, distributed.DistContext(0, 3, 0).world_size)


def test_batch_shards_are_refused_under_ddp():
    cfg = load_config(None, ["train.batch_shards=2"])
    checks.check_distributed(cfg, distributed.DistContext().world_size)  # one process: fine
    with pytest.raises(ConfigError, match="batch_shards=2 cannot be combined with 2 torchrun"):
        checks.check_distributed(cfg, distributed.DistContext(0, 2, 0).world_size)


def test_device_per_rank():
    ctx = distributed.DistContext(1, 2, 1)
    assert distributed.device_for_rank(torch.device("cpu"), ctx) == torch.device("cpu")
    mps = torch.device("mps")
    assert distributed.device_for_rank(mps, distributed.DistContext()) == mps  # untouched
    with pytest.raises(ConfigError, match="device mps does not support data-parallel"):
        distributed.device_for_rank(mps, ctx)
    if torch.cuda.device_count() <= 1:
        with pytest.raises(ConfigError, match="LOCAL_RANK 1 has no GPU"):
            distributed.device_for_rank(torch.device("cuda"), ctx)


BACKWARDS = [(kind, backward) for kind in MODEL_KINDS
             for backward in (["manual", "autograd"] if kind.endswith("_scratch") else ["auto"])]


@pytest.mark.parametrize("kind,backward", BACKWARDS)
@pytest.mark.parametrize("embedding_dim", [None, 4])
def test_every_parameter_gets_a_gradient(kind, backward, embedding_dim):
    """Why DDP runs without find_unused_parameters: one step touches every parameter."""
    cfg = load_config(None, [f"model.kind={kind}", f"model.backward={backward}",
                             "model.hidden_size=6", "model.num_layers=2",
                             f"model.embedding_dim={'null' if embedding_dim is None else 4}"])
    model = build_model(cfg.model, 7)
    logits, _ = model(torch.randint(0, 7, (3, 5)), model.begin_state(3))
    logits.sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []


def _two_rank_worker(rank, init_file, results):
    """Runs in a spawned process: one rank of a 2-process gloo group."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=2)
    try:
        ctx = distributed.DistContext(rank, 2, rank)
        full = tuple(torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3) + k
                     for k in range(2))  # (L=2, B=4, H=3) state of two tensors, LSTM-like
        mine = distributed.shard_lanes(full, ctx)
        gathered = distributed.gather_lanes(mine)
        # Rank 1 is asked to stop before step 3; both ranks must stop after the same step.
        stopped_after = None
        for step in range(1, 6):
            stop = distributed.StopAgreement(lambda s=step: rank == 1 and s >= 3)
            stop.begin_step()
            if stop.should_stop():
                stopped_after = step
                break
        results.put((rank, mine[0].shape[1], all(torch.equal(a, b)
                                                  for a, b in zip(gathered, full)),
                     stopped_after))
    finally:
        dist.destroy_process_group()


def test_lanes_gather_and_shard_and_ranks_agree_to_stop(tmp_path):
    mp = torch.multiprocessing.get_context("spawn")
    results = mp.Queue()
    procs = [mp.Process(target=_two_rank_worker, args=(r, tmp_path / "init", results))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    got = sorted(results.get(timeout=5) for _ in range(2))
    assert got == [(0, 2, True, 3), (1, 2, True, 3)]


def test_stop_agreement_single_process_reads_the_flag():
    asked = []
    stop = distributed.StopAgreement(lambda: bool(asked))
    stop.begin_step()
    assert not stop.should_stop()
    asked.append(1)
    stop.begin_step()
    assert stop.should_stop()


def test_fault_injector_kills_once(tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    exits = []
    monkeypatch.setattr(distributed.os, "_exit", lambda code: exits.append(code))
    env = {distributed.KILL_ENV: f"1:3:{marker}"}
    other = distributed.FaultInjector(distributed.DistContext(0, 2, 0), env)
    victim = distributed.FaultInjector(distributed.DistContext(1, 2, 1), env)
    for _ in range(5):
        other.step()
        victim.step()
    assert exits == [17] and marker.read_text() == "killed at step 3\n"
    restarted = distributed.FaultInjector(distributed.DistContext(1, 2, 1), env)
    for _ in range(5):
        restarted.step()
    assert exits == [17]  # the marker keeps the restarted rank alive


def test_signal_repeats_are_merged_only_under_torchrun():
    assert distributed.signal_repeat_window_s({}) == 0.0
    assert distributed.signal_repeat_window_s({"TORCHELASTIC_RUN_ID": "x"}) > 0.1


def test_torchrun_workers_leave_without_interpreter_shutdown(monkeypatch):
    """A worker of a multi-process job flushes its output and leaves with os._exit (the
    gloo threads that DDP keeps alive must not meet a shutting-down interpreter); a plain
    process exits normally, through SystemExit, with the same code."""
    from rnnlm import cli

    class Left(Exception):
        pass

    def fake_os_exit(code):
        raise Left(code)

    class Stream(io.StringIO):
        flushed = 0

        def flush(self):
            self.flushed += 1

    monkeypatch.setattr(cli.os, "_exit", fake_os_exit)
    monkeypatch.setattr(sys, "stdout", Stream())
    monkeypatch.setattr(sys, "stderr", Stream())
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Left) as left:
        cli.run_main(lambda: 130)
    assert left.value.args == (130,)
    assert sys.stdout.flushed == sys.stderr.flushed == 1  # os._exit would drop buffered text
    for alone in ("1", "not a number"):
        monkeypatch.setenv("WORLD_SIZE", alone)
        with pytest.raises(SystemExit) as done:
            cli.run_main(lambda: None)
        assert done.value.code == 0
    monkeypatch.delenv("WORLD_SIZE")
    assert not cli.torchrun_worker()
