import ctypes
import os
from pathlib import Path

import pytest
import torch

from rnnlm.config import ConfigError, config_from_dict, load_config
from rnnlm.kernels import native
from rnnlm.models import MODEL_KINDS, build_model
from rnnlm.training.run import train
from rnnlm.training.step import ShardedForwardBackward, forward_backward, shard_pool
from tests.conftest import ROOT
from tests.training.test_epoch import read_metrics


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
@pytest.mark.parametrize("shards", [2, 3])
def test_sharded_gradients_equal_single_thread(kind, shards):
    torch.manual_seed(0)
    cfg = config_from_dict({}, [f"model.kind={kind}", "model.hidden_size=6",
                                "model.num_layers=2"])
    model = build_model(cfg.model, 9).double()
    X, Y = torch.randint(0, 9, (7, 5)), torch.randint(0, 9, (7, 5))
    state = tuple(torch.randn_like(s) for s in model.begin_state(7))
    results = []
    sharded = ShardedForwardBackward(shards)
    for step in (forward_backward, sharded):
        model.zero_grad(set_to_none=True)
        loss, new_state = step(model, X, Y, state)
        results.append((loss.detach(), [s.detach() for s in new_state],
                        [p.grad.clone() for p in model.parameters()]))
    sharded.close()
    (l1, s1, g1), (l2, s2, g2) = results
    torch.testing.assert_close(l1, l2, atol=1e-12, rtol=1e-12)
    for a, b in zip(s1 + g1, s2 + g2):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_sharded_training_matches_and_repeats(tiny_overrides, tmp_path):
    runs = {}
    for name, shards in [("one", 1), ("two", 2), ("two_again", 2)]:
        cfg = load_config(ROOT / "configs/tiny.yaml",
                          [*tiny_overrides[:1], f"out_dir={tmp_path / name}",
                           f"train.batch_shards={shards}", "model.kind=gru_scratch",
                           "train.epochs=3"])
        train(cfg, quiet=True)
        runs[name] = [r["train_loss"] for r in read_metrics(tmp_path / name)]
    assert runs["two"] == runs["two_again"]  # deterministic, bit for bit
    for a, b in zip(runs["one"], runs["two"]):
        assert a == pytest.approx(b, rel=1e-5)  # the same training, up to rounding


def test_shard_threads_run_openmp_with_the_shard_thread_count():
    """torch.set_num_threads(1) in the main thread does not reach OpenMP in threads started
    later: without the pool's initializer each shard's MKL products would use every core."""
    libs = sorted(Path(torch.__file__).parent.joinpath("lib").glob("libgomp*.so*"))
    if not libs or (os.cpu_count() or 1) < 2:
        pytest.skip("needs torch's libgomp and two cores")
    omp_max_threads = ctypes.CDLL(str(libs[0])).omp_get_max_threads
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pool = shard_pool(2)
        assert list(pool.map(lambda _: omp_max_threads(), range(2))) == [1, 1]
        pool.shutdown()
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("setting", ["train.batch_shards=2", "train.threads=1"])
def test_a_run_gives_back_the_callers_thread_count(setting, tiny_overrides, tmp_path):
    """bench.py trains preset after preset in one process: a sharded run (one thread per
    shard) must not leave the next run on one thread."""
    seen = []
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        cfg = load_config(ROOT / "configs/tiny.yaml",
                          [*tiny_overrides[:1], f"out_dir={tmp_path}", setting,
                           "train.epochs=1"])
        with pytest.MonkeyPatch.context() as patch:
            import rnnlm.training.run as trainer
            real = trainer.load_corpus
            patch.setattr(trainer, "load_corpus",
                          lambda *a: seen.append(torch.get_num_threads()) or real(*a))
            train(cfg, quiet=True)
        assert seen == [1]  # the run itself used one thread
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("overrides, device, distributed, cores, expected", [
    (["train.batch_shards=auto"], "cpu", False, 2, 2),
    (["train.batch_shards=auto", "model.kind=gru_scratch"], "cpu", False, 16, 2),
    (["train.batch_shards=auto"], "cuda", False, 2, 1),
    (["train.batch_shards=auto"], "cpu", True, 2, 1),  # torchrun: a process per core
    (["train.batch_shards=auto"], "cpu", False, 1, 1),
    # nn.LSTM: oneDNN's fused kernel already uses both cores; its C windows do not
    (["train.batch_shards=auto", "model.kind=lstm", "model.cell_kernel=torch"], "cpu", False, 2,
     1),
    pytest.param(["train.batch_shards=auto", "model.kind=lstm"], "cpu", False, 2, 2,
                 marks=pytest.mark.skipif(not native.windows_available(),
                                          reason="no C window loops here")),
    (["train.batch_shards=auto", "model.kind=lstm", "train.precision=bf16"], "cpu", False, 2,
     1),
    (["train.batch_shards=auto", "train.compile=true"], "cpu", False, 2, 1),
    (["train.batch_shards=auto", "model.dropout=0.2", "model.num_layers=2"], "cpu", False, 2,
     1),
    (["train.batch_shards=auto", "model.embedding_dim=8", "model.input_dropout=0.1"], "cpu",
     False, 2, 1),
    (["train.batch_shards=auto", "data.batch_size=1"], "cpu", False, 2, 1),
    (["train.batch_shards=3"], "cpu", False, 1, 3),  # a number is taken as given
    # bf16 products: MKL's bf16 GEMM on both cores beats a shard per core
    (["train.batch_shards=auto", "model.kind=rnn_scratch", "train.precision=bf16"], "cpu",
     False, 2, 1),
    (["train.batch_shards=auto", "train.precision=auto"], "cpu", False, 2, "1 if bf16 else 2"),
])
@pytest.mark.parametrize("bf16_cpu", [True, False])
def test_auto_batch_shards(overrides, device, distributed, cores, expected, bf16_cpu,
                           monkeypatch):
    import rnnlm.training.step as shards
    monkeypatch.setattr(native, "cpu_multiplies_bf16", lambda: bf16_cpu)
    if isinstance(expected, str):
        expected = 1 if bf16_cpu else 2
    monkeypatch.setattr(shards, "usable_cores", lambda: cores)
    cfg = config_from_dict({}, overrides)
    assert shards.resolve_batch_shards(cfg, torch.device(device), distributed) == expected


def test_auto_batch_shards_trains_sharded_and_is_kept_as_auto(tiny_overrides, tmp_path,
                                                             monkeypatch):
    import rnnlm.training.step as shards
    monkeypatch.setattr(shards, "usable_cores", lambda: 2)
    made = []
    real = shards.ShardedForwardBackward.__init__
    monkeypatch.setattr(shards.ShardedForwardBackward, "__init__",
                        lambda self, n, *a, **k: made.append(n) or real(self, n, *a, **k))
    cfg = load_config(ROOT / "configs/tiny.yaml",
                      [*tiny_overrides[:1], f"out_dir={tmp_path}", "train.batch_shards=auto",
                       "model.kind=rnn_scratch", "train.epochs=1"])
    train(cfg, quiet=True)
    assert made == [2]
    assert "batch_shards: auto" in (tmp_path / "config.yaml").read_text()


@pytest.mark.parametrize("overrides, fragment", [
    (["train.batch_shards=autox"], "train.batch_shards must be an integer or one of auto"),
    (["train.batch_shards=0"], "train.batch_shards must be >= 1"),
    (["train.batch_shards=2", "model.dropout=0.2", "model.num_layers=2"], "needs model.dropout 0"),
    (["train.batch_shards=64"], "cannot exceed data.batch_size"),
])
def test_bad_shard_settings(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        config_from_dict({}, overrides)
