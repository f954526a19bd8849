"""Perplexity plots: written without a display, atomically, log scale only when it helps."""

import pytest
from matplotlib.figure import Figure

import rnnlm.training.plots as plots


@pytest.fixture
def captured(monkeypatch):
    figures = []
    real = plots._save

    def keep(fig: Figure, path):
        figures.append(fig)
        real(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def records(train, val_every=2):
    return [{"epoch": e + 1, "train_ppl": p, **({"val_ppl": p * 1.1} if (e + 1) %
                                                val_every == 0 else {})}
            for e, p in enumerate(train)]


def test_train_and_val_curves(tmp_path, captured):
    path = tmp_path / "perplexity.png"
    plots.plot_perplexity(records([27, 10, 5, 3, 2]), path, "run")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = captured[-1].axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    assert list(lines["train"].get_xdata()) == [1, 2, 3, 4, 5]
    assert list(lines["validation"].get_xdata()) == [2, 4]
    assert ax.get_yscale() == "log"  # 27 .. 2 spans more than LOG_SCALE_RATIO
    assert [p.name for p in tmp_path.iterdir()] == ["perplexity.png"]  # no temporary left


def test_linear_scale_for_a_narrow_range(tmp_path, captured):
    plots.plot_perplexity(records([3.0, 2.8, 2.7], val_every=99), tmp_path / "p.png")
    ax = captured[-1].axes[0]
    assert ax.get_yscale() == "linear" and [x.get_label() for x in ax.lines] == ["train"]


def test_rewrite_replaces_the_file(tmp_path):
    path = tmp_path / "perplexity.png"
    plots.plot_perplexity(records([5, 4]), path)
    first = path.read_bytes()
    plots.plot_perplexity(records([5, 4, 3, 2, 1.5]), path)
    assert path.read_bytes() != first


def test_comparison_plot(tmp_path, captured):
    plots.plot_comparison({"a": records([9, 5, 4]), "b": records([8, 6, 5])},
                          tmp_path / "c.png", "cmp")
    labels = [line.get_label() for line in captured[-1].axes[0].lines]
    assert labels == ["a (train)", "a (val)", "b (train)", "b (val)"]


def test_the_run_redraws_at_each_evaluation_and_at_the_end(tiny_overrides, monkeypatch):
    import rnnlm.training.run
    from rnnlm.config import load_config
    from tests.conftest import ROOT

    calls = []
    monkeypatch.setattr(rnnlm.training.run, "plot_perplexity",
                        lambda records, path, title: calls.append((len(records), path.name)))
    cfg = load_config(ROOT / "configs/tiny.yaml",
                      [*tiny_overrides, "data.split=[0.8,0.1,0.1]", "train.epochs=5",
                       "train.eval_every=2", "model.hidden_size=8"])
    rnnlm.training.run.train(cfg, quiet=True)
    assert calls == [(2, "perplexity.png"), (4, "perplexity.png"), (5, "perplexity.png"),
                     (5, "perplexity.png")]  # epochs 2, 4, the last epoch, the end
    calls.clear()
    cfg = load_config(ROOT / "configs/tiny.yaml", [*tiny_overrides, "train.epochs=5",
                                                   "train.predict_every=2"])
    rnnlm.training.run.train(cfg, quiet=True, overwrite=True)
    assert [n for n, _ in calls] == [2, 4, 5]  # no validation: the progress epochs, the end
