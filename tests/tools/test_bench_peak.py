"""bench.py against the hardware: the core's GEMM peak, the cores a run keeps busy, and the
table's per-core columns next to the roofline's."""

import pytest
import torch

from rnnlm.config import load_config
from rnnlm.tools import bench
from tests.conftest import ROOT


def test_the_peak_is_measured_on_one_thread_for_both_dtypes(monkeypatch):
    threads = []
    real_mm = torch.mm

    def watched_mm(*args, **kwargs):
        threads.append(torch.get_num_threads())
        return real_mm(*args, **kwargs)

    before = torch.get_num_threads()
    torch.set_num_threads(3)  # not 1, which an xdist worker may run on (tests/conftest.py)
    try:
        monkeypatch.setattr(torch, "mm", watched_mm)
        peaks = bench.machine_peaks(size=64, reps=2)
        assert set(peaks) == {"fp32", "bf16"} and all(v > 0 for v in peaks.values())
        assert threads == [1] * 6  # a warm-up and two timed products per dtype, on one core
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    line = bench.peak_line(peaks, size=64, reps=2)
    assert f"fp32 {peaks['fp32']:,.0f} GFLOP/s" in line and "one 64x64 product" in line
    assert f"bf16 {peaks['bf16']:,.0f} GFLOP/s" in line


def test_threads_used_follows_the_run_s_own_choice(monkeypatch):
    monkeypatch.setattr(bench, "usable_cores", lambda: 2)
    lstm = ROOT / "configs" / "lstm.yaml"  # torch.nn LSTM on its fused layer: never sharded
    fused = "model.cell_kernel=torch"
    assert bench.threads_used(load_config(lstm, ["train.threads=1", fused])) == 1
    assert bench.threads_used(load_config(lstm, ["train.threads=8", fused])) == 2  # two cores
    sharded = load_config(ROOT / "configs" / "rnn_scratch.yaml", ["train.batch_shards=2"])
    assert bench.threads_used(sharded) == 2  # one intra-op thread in each shard


def preset_row(**extra):
    return {"preset": "rnn", "ours": 50_000.0, "ref": 10_000.0, "ratio": 5.0,
            "ratio_range": None, "vs_preset": 1.0, "mflop_per_token": 2.0, "gflops": 40.0,
            "roofline": 20_000.0, "fraction": 0.5, "fraction_range": (0.4, 0.6),
            "ours_ppl": 1.5, "ref_ppl": 1.6, **extra}


def cells(line):
    return [c.strip() for c in line.strip("|").split("|")]


def test_the_table_gives_per_core_speed_against_both_peaks_and_the_roofline():
    numbers = bench.achieved(50_000.0, 2e6, threads=2, peaks={"fp32": 100.0, "bf16": 800.0})
    # 50,000 tok/s x 2 MFLOP/token = 100 GFLOP/s over 2 cores
    assert numbers == {"threads": 2, "gflops_core": pytest.approx(50.0),
                       "of_fp32": pytest.approx(0.5), "of_bf16": pytest.approx(0.0625)}
    numbers = bench.achieved(1e6, 2e6, threads=2, peaks={"fp32": 100.0, "bf16": 800.0})
    head, rule, cpu, gpu = bench.preset_table([preset_row(**numbers), preset_row()],
                                              variants=False)
    titles = cells(head)
    assert titles[8:12] == ["GFLOP/s per core", "of fp32 peak", "of bf16 peak", "of roofline"]
    assert titles[1] == "precision"
    assert rule.count("---") == len(titles)
    row = dict(zip(titles, cells(cpu)))
    assert row["GFLOP/s per core"] == "1000.0"  # 1e6 tok/s x 2 MFLOP / 2 cores
    assert row["of fp32 peak"] == "1000.0%" and row["of bf16 peak"] == "125.0%"
    assert row["of roofline"] == "50% (40-60%)" and row["matmul GFLOP/s"] == "40"
    gpu_row = dict(zip(titles, cells(gpu)))  # no CPU peak on a GPU run
    assert [gpu_row[t] for t in titles[8:11]] == ["n/a"] * 3
    assert gpu_row["precision"] == "fp32"  # a row that does not say is an fp32 one
    with_variants = bench.preset_table([preset_row(**numbers)], variants=True)
    assert "| vs preset |" in with_variants[0]
    assert len(cells(with_variants[2])) == len(cells(with_variants[0]))
