"""Splits and held-out evaluation: boundaries, normalisation, the uniform model."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rnnlm.config import ConfigError, DataConfig, config_from_dict, load_config
from rnnlm.data.corpus import DataError, load_corpus
from rnnlm.data.splits import split_ids
from rnnlm.evaluation.evaluate import evaluate, lane_bounds
from rnnlm.models import MODEL_KINDS, build_model
from rnnlm.training.best import BestWeights
from rnnlm.training.metrics import MetricsLog
from rnnlm.training.run import score_test_split, train
from tests.conftest import ROOT

CPU = torch.device("cpu")


@pytest.mark.parametrize("n", [100, 101, 997, 170_580])
@pytest.mark.parametrize("fractions", [[0.9, 0.05, 0.05], [0.8, 0.2, 0.0], [0.5, 0.0, 0.5],
                                       [0.34, 0.33, 0.33]])
def test_split_boundaries_cover_the_stream_once(n, fractions):
    ids = np.arange(n)
    s = split_ids(ids, fractions)
    parts = [p for p in (s.train, s.val, s.test) if p is not None]
    assert np.array_equal(np.concatenate(parts), ids)  # in order, no overlap, nothing lost
    assert (s.val is None) == (fractions[1] == 0) and (s.test is None) == (fractions[2] == 0)
    for part, f in ((s.val, fractions[1]), (s.test, fractions[2])):
        if part is not None:
            assert len(part) == math.floor(n * f)
    assert np.shares_memory(s.train, ids)  # views, not copies


def test_no_split_trains_on_everything():
    ids = np.arange(10)
    s = split_ids(ids, None)
    assert s.train is ids and s.val is None and s.test is None


def test_time_machine_split_is_the_tail(data_dir):
    cfg = DataConfig(data_dir=str(data_dir), max_tokens=None, split=[0.9, 0.05, 0.05])
    corpus = load_corpus(cfg)
    whole = load_corpus(DataConfig(data_dir=str(data_dir), max_tokens=None)).ids
    s = corpus.splits
    assert (len(s.train), len(s.val), len(s.test)) == (153_522, 8_529, 8_529)
    assert np.array_equal(s.val, whole[153_522:162_051])
    assert np.array_equal(s.test, whole[162_051:])
    # max_tokens cuts the stream before it is split
    cut = load_corpus(DataConfig(data_dir=str(data_dir), max_tokens=10_000,
                                 split=[0.8, 0.1, 0.1])).splits
    assert (len(cut.train), len(cut.val), len(cut.test)) == (8_000, 1_000, 1_000)
    assert np.array_equal(cut.test, whole[9_000:10_000])


@pytest.mark.parametrize("n, lanes", [(10, 1), (10, 3), (11, 4), (8, 4)])
def test_lanes_cover_the_split(n, lanes):
    starts, sizes = lane_bounds(n, lanes)
    assert sizes.sum() == n and sizes.max() - sizes.min() <= 1 and sizes.min() >= 2
    assert np.array_equal(starts[1:], np.cumsum(sizes)[:-1]) and starts[0] == 0


def uniform_model(kind, vocab_size):
    model = build_model(config_from_dict({}, [f"model.kind={kind}",
                                              "model.hidden_size=8"]).model, vocab_size)
    with torch.no_grad():
        model.output.weight.zero_()
        model.output.bias.zero_()
    return model


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
@pytest.mark.parametrize("lanes", [1, 3])
def test_uniform_model_scores_the_vocabulary_size(kind, lanes):
    ids = np.random.default_rng(0).integers(0, 28, size=301)
    result = evaluate(uniform_model(kind, 28), ids, lanes, CPU, window=16)
    assert result.tokens == 301 - lanes
    assert result.ppl == pytest.approx(28.0, rel=1e-6)
    assert result.bpc == pytest.approx(math.log2(28), rel=1e-6)


def manual_loss(model, ids, lanes):
    """The definition, written plainly: each lane in one forward call, from a zero state."""
    starts, sizes = lane_bounds(len(ids), lanes)
    total, count = 0.0, 0
    with torch.no_grad():
        for start, size in zip(starts, sizes):
            lane = torch.as_tensor(ids[start: start + size], dtype=torch.long)
            logits, _ = model(lane[:-1].view(1, -1), model.begin_state(1))
            total += F.cross_entropy(logits[:, 0], lane[1:], reduction="sum").item()
            count += size - 1
    return total / count, count


@pytest.mark.parametrize("lanes, window", [(1, 7), (1, 1000), (4, 5), (5, 64)])
def test_evaluation_is_the_mean_over_predicted_tokens(lanes, window):
    torch.manual_seed(0)
    model = build_model(config_from_dict({}, ["model.kind=gru", "model.hidden_size=16",
                                              "model.dropout=0.5", "model.num_layers=2"]).model,
                        12)
    model.train()  # evaluate must switch dropout off, and restore the mode afterwards
    ids = np.random.default_rng(1).integers(0, 12, size=203)
    model.eval()
    expected, count = manual_loss(model, ids, lanes)
    model.train()
    result = evaluate(model, ids, lanes, CPU, window=window)
    assert model.training
    assert result.tokens == count == 203 - lanes
    assert result.loss == pytest.approx(expected, rel=1e-5)


def test_evaluation_reads_a_memmap(tmp_path):
    ids = np.random.default_rng(2).integers(0, 10, size=100).astype(np.uint8)
    ids.tofile(tmp_path / "ids")
    mapped = np.memmap(tmp_path / "ids", dtype=np.uint8, mode="r")
    model = uniform_model("rnn", 10)
    assert evaluate(model, mapped, 2, CPU).loss == evaluate(model, ids, 2, CPU).loss


def test_best_weights_keep_a_copy():
    model = torch.nn.Linear(2, 2)
    best = BestWeights()
    assert best.offer(5.0, 1, model) and not best.offer(6.0, 2, model)
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not torch.equal(best.state["weight"], model.weight)
    assert best.offer(4.0, 3, model) and best.epoch == 3


def test_heldout_split_too_short_says_the_minimum(data_dir):
    with pytest.raises(DataError, match=r"validation split .* has 1 tokens, .* at least 8"):
        load_corpus(DataConfig(data_dir=str(data_dir), max_tokens=2000, batch_size=2,
                               num_steps=5, split=[0.9995, 0.0005, 0], eval_lanes=4))


@pytest.mark.parametrize("overrides, fragment", [
    (["data.split=[0.9, 0.1]"], "data.split must be three fractions"),
    (["data.split=[0.9, 0.2, -0.1]"], "data.split must be three fractions"),
    (["data.split=[0.5, 0.2, 0.2]"], "must sum to 1"),
    (["data.split=[0, 0.5, 0.5]"], "train > 0"),
    (["data.split=0.9"], "data.split must be a list"),
    (["data.eval_lanes=0"], "data.eval_lanes must be >= 1"),
    (["train.eval_every=-1"], "train.eval_every must be >= 0"),
])
def test_split_config_errors(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        config_from_dict({}, overrides)
    assert fragment in str(info.value)


def read_records(out_dir):
    return [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_with_a_split_logs_val_and_test(tiny_overrides, tmp_path):
    cfg = load_config(ROOT / "configs/tiny.yaml",
                      [*tiny_overrides, "data.split=[0.8, 0.1, 0.1]", "train.epochs=4",
                       "train.eval_every=2", "model.kind=gru", "data.eval_lanes=2"])
    final = train(cfg, quiet=True)
    records = read_records(tmp_path / "run")
    epochs, test = records[:-1], records[-1]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert ["val_ppl" in r for r in epochs] == [False, True, False, True]
    for r in epochs[1::2]:
        assert r["val_bpc"] == pytest.approx(r["val_loss"] / math.log(2))
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert r["val_tokens"] == 200 - 2
    best_epoch = min(epochs[1::2], key=lambda r: r["val_ppl"])["epoch"]
    assert test["event"] == "test" and test["weights_epoch"] == best_epoch
    assert test["test_tokens"] == 198 and math.isfinite(test["test_ppl"])
    assert final["test_ppl"] == test["test_ppl"] and final["best_epoch"] == best_epoch
    assert (tmp_path / "run" / "perplexity.png").stat().st_size > 1000


def test_test_split_scores_the_best_weights_not_the_last(tmp_path):
    """The best weights here are a uniform model, the current ones are not: the test score
    must be exactly the vocabulary size."""
    best = BestWeights()
    best.offer(1.0, 7, uniform_model("lstm", 28))
    torch.manual_seed(0)
    current = build_model(config_from_dict({}, ["model.kind=lstm", "model.hidden_size=8"]).model,
                          28)
    ids = np.random.default_rng(0).integers(0, 28, size=100)
    assert evaluate(current, ids, 1, CPU).ppl != pytest.approx(28.0, rel=1e-3)
    cfg = config_from_dict({}, ["data.eval_lanes=2"])
    log = MetricsLog(tmp_path / "metrics.jsonl")
    result = score_test_split(current, best, ids, cfg, CPU, log, say=lambda line: None)
    assert result["test_ppl"] == pytest.approx(28.0, rel=1e-6) and result["test_tokens"] == 98
    assert read_records(tmp_path)[-1]["weights_epoch"] == 7


def test_heldout_presets():
    """One held-out preset per model family and preprocessing, all on the whole book, 90/5/5."""
    for kind in ("lstm", "gru", "rnn"):
        for suffix, preprocess in (("", "d2l"), ("_raw", "raw")):
            cfg = load_config(ROOT / "configs" / f"heldout_{kind}{suffix}.yaml")
            assert cfg.model.kind == kind and cfg.data.preprocess == preprocess
            assert cfg.data.split == [0.9, 0.05, 0.05] and cfg.data.max_tokens is None
            assert cfg.out_dir == f"runs/heldout_{kind}{suffix}"
    # The best measured recipe on each text: D2L 0.17's (d2l) and D2L 1.0's (d2l_spaced)
    tuned = load_config(ROOT / "configs" / "heldout_lstm_tuned.yaml")
    spaced = load_config(ROOT / "configs" / "heldout_lstm_spaced.yaml")
    assert (tuned.data.preprocess, spaced.data.preprocess) == ("d2l", "d2l_spaced")
    assert spaced.data.split == [0.9, 0.05, 0.05] and spaced.data.max_tokens is None
    assert spaced.model == tuned.model and spaced.out_dir == "runs/heldout_lstm_spaced"


@pytest.mark.xdist_group("torchrun")  # one torchrun job at a time (tests/conftest.py)
def test_two_processes_evaluate_like_one(data_dir, tmp_path, monkeypatch):
    """Under DDP every rank scores the whole held-out split with the same weights: the
    validation and test numbers of a 2-process run equal the 1-process ones."""
    import subprocess

    from tests.training.test_distributed import TORCHRUN, single_process_env

    overrides = [f"data.data_dir={data_dir}", "train.epochs=2", "train.threads=1",
                 "model.kind=gru", "data.split=[0.8,0.1,0.1]", "train.ema_decay=0.9",
                 "train.lr_schedule=cosine"]
    flat = [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run(
        [*TORCHRUN, "--nproc_per_node=2", "train.py", "--config", "configs/tiny.yaml", *flat,
         "--set", f"out_dir={tmp_path / 'ddp'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, env=single_process_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    train(load_config(ROOT / "configs/tiny.yaml", [*overrides, f"out_dir={tmp_path / 'one'}"]),
          quiet=True)
    ddp, one = read_records(tmp_path / "ddp"), read_records(tmp_path / "one")
    assert len(ddp) == len(one) == 3 and ddp[-1]["event"] == "test"
    for a, b in zip(ddp, one):
        for key in ("val_loss", "test_loss", "lr"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5), key
