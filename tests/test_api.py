"""The notebook API (rnnlm.train, rnnlm.load, rnnlm.generate) and docs/notebook.ipynb run
through `jupyter nbconvert --execute`."""

import json
import subprocess
import sys

import pytest

import rnnlm
from rnnlm import api
from rnnlm.cli import script_main
from rnnlm.config import load_config, parse_override
from rnnlm.models import LanguageModel
from tests.conftest import ROOT

SETTINGS = {"train.epochs": 2, "train.threads": 1, "data.max_tokens": 600,
            "train.predict_chars": 20}


# One xdist worker runs this module, so its trained fixture is made once (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("test_api")


@pytest.fixture(scope="module")
def run(tmp_path_factory, time_machine_path):
    """A 2-epoch tiny run trained through the API."""
    root = tmp_path_factory.mktemp("api")
    return rnnlm.train(ROOT / "configs" / "tiny.yaml", out_dir=root / "run", quiet=True,
                       overrides={**SETTINGS, "data.data_dir": str(time_machine_path.parent)})


def test_train_returns_the_model_its_vocabulary_and_metrics(run):
    assert isinstance(run, rnnlm.Run) and isinstance(run.model, LanguageModel)
    assert not run.model.training and run.path == run.out_dir / "last.pt"
    assert run.config.train.epochs == 2 and run.config.out_dir == str(run.out_dir)
    assert len(run.vocab) == 28 and run.preprocess == "d2l"  # 26 letters, space, <unk>
    lines = (run.out_dir / "metrics.jsonl").read_text().splitlines()
    assert run.metrics == [json.loads(line) for line in lines]
    assert [r["epoch"] for r in run.metrics] == [1, 2]
    assert run.result["epoch"] == 2 and run.result["train_ppl"] == run.metrics[-1]["train_ppl"]
    assert "2 epoch records" in repr(run) and "rnn_scratch" in repr(run)
    # the greedy text is the prediction the run printed at its end
    assert rnnlm.generate(run, num_chars=20) == run.result["prediction"]


def test_generate_is_what_sample_py_prints(run, capsys):
    sample = script_main("sample")
    last = str(run.out_dir / "last.pt")
    model = rnnlm.load(last, device="cpu")
    assert isinstance(model, rnnlm.TrainedModel) and model.path == run.out_dir / "last.pt"
    for sample_args, api_args in [
        (["--greedy"], {}),
        (["--temperature", "0.8", "--top-k", "5", "--seed", "3"],
         {"temperature": 0.8, "top_k": 5, "seed": 3}),
        (["--temperature", "1.5", "--top-p", "0.9", "--seed", "4"],
         {"temperature": 1.5, "top_p": 0.9, "seed": 4}),
    ]:
        assert sample(["--checkpoint", last, "--prefix", "the time", "--num-chars", "40",
                       "--device", "cpu", *sample_args]) == 0
        printed = capsys.readouterr().out
        for trained in (run, model):
            assert rnnlm.generate(trained, "the time", 40, **api_args) + "\n" == printed
    assert rnnlm.generate(model, "the time", 40, temperature=0) == \
        rnnlm.generate(model, "the time", 40)


def test_load_reads_best_pt_too(run):
    best = rnnlm.load(run.out_dir / "best.pt", device="cpu")
    assert best.config.model.kind == "rnn_scratch" and best.vocab.tokens == run.vocab.tokens
    assert best.preprocess == run.preprocess == "d2l"


def test_overrides_keep_their_types():
    for key, value in [("data.split", [0.8, 0.1, 0.1]), ("out_dir", "runs/x"),
                       ("train.lr", 0.5), ("train.prefix", "yes"), ("train.prefix", "1.0"),
                       ("model.embedding_dim", None), ("train.compile", True),
                       ("train.prefix", "a ... b..."), ("train.prefix", "it's: #1")]:
        assert parse_override(api._override(key, value)) == (key, value)
    assert api._override_items(["train.lr=0.5"]) == ["train.lr=0.5"]
    assert api._override_items("train.lr=0.5") == ["train.lr=0.5"]


def test_a_config_object_trains_too(tmp_path, tiny_overrides):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", tiny_overrides)
    run = rnnlm.train(cfg, epochs=1, quiet=True, overrides=["data.max_tokens=600",
                                                             "train.threads=1"])
    assert [r["epoch"] for r in run.metrics] == [1]
    assert run.out_dir == tmp_path / "run"
    with pytest.raises(rnnlm.ConfigError, match="already holds last.pt"):
        rnnlm.train(cfg, epochs=1, quiet=True)
    again = rnnlm.train(cfg, epochs=1, quiet=True, overwrite=True,
                        overrides={"data.max_tokens": 600, "train.threads": 1})
    assert len(again.metrics) == 1


@pytest.mark.parametrize("call, fragment", [
    (lambda run: rnnlm.train("configs/nope.yaml"), "config file configs/nope.yaml not found"),
    (lambda run: rnnlm.train(ROOT / "configs/tiny.yaml", epochs=-1), "train.epochs must be"),
    (lambda run: rnnlm.train(42), "config must be the path of a YAML file or a Config"),
    (lambda run: rnnlm.load(ROOT / "nope.pt"), "not found"),
    (lambda run: rnnlm.generate(run.model, "the"), "what rnnlm.train or rnnlm.load returned"),
    (lambda run: rnnlm.generate(run, "the", 10, top_k=3), "top_k would have no effect"),
    (lambda run: rnnlm.generate(run, "the", 10, seed=1, top_p=0.5), "top_p, seed would"),
    (lambda run: rnnlm.generate(run, "the", 10, temperature=-1), "temperature must be >= 0"),
    (lambda run: rnnlm.generate(run, "the", 0), "num_chars must be a whole number >= 1"),
    (lambda run: rnnlm.generate(run, "the", 10, 1.0, top_p=2.0), r"top_p must be in \(0, 1\]"),
    (lambda run: rnnlm.generate(run, "the", 10, 1.0, top_k=0), "top_k must be >= 1"),
    (lambda run: rnnlm.generate(run, "the", 10, unknown="skip"), "unknown must be"),
    (lambda run: rnnlm.generate(run, "7%", 10), "is empty after d2l preprocessing"),
])
def test_user_errors_are_one_line_config_errors(run, call, fragment):
    with pytest.raises(rnnlm.ConfigError, match=fragment) as error:
        call(run)
    assert len(str(error.value).splitlines()) == 1


def test_import_rnnlm_is_light_and_train_is_the_function():
    code = ("import sys, rnnlm\nassert 'torch' not in sys.modules\n"
            "import rnnlm.training\nassert callable(rnnlm.train) and rnnlm.train.__module__ == "
            "'rnnlm.api'\nassert rnnlm.training.__name__ == 'rnnlm.training'\n"
            "assert {'train', 'load', 'generate', 'Run'} <= set(dir(rnnlm))\nprint('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rnnlm.nope  # noqa: B018


def test_the_example_notebook_runs(tmp_path):
    """docs/notebook.ipynb from top to bottom in a fresh kernel (nbconvert fails on the
    first cell that raises); about 10 s, most of it starting the kernel and torch."""
    pytest.importorskip("nbconvert", reason='the test extra: pip install -e ".[test]"')
    proc = subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook",
                           "--execute", "--ExecutePreprocessor.timeout=120",
                           "--output-dir", str(tmp_path), str(ROOT / "docs" / "notebook.ipynb")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    executed = json.loads((tmp_path / "notebook.ipynb").read_text())
    outputs = [o for cell in executed["cells"] if cell["cell_type"] == "code"
               for o in cell["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"]
    shown = "".join("".join(o.get("data", {}).get("text/plain", "")) + "".join(o.get("text", ""))
                    for o in outputs)
    assert "Run(rnn_scratch" in shown and "epoch 5: train perplexity" in shown
    assert "'last.pt', 'metrics.jsonl'" in shown
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the perplexity plot
    # the progress bar is tqdm's notebook widget (tqdm.auto, with ipywidgets installed)
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
               for o in outputs)


def test_train_follows_auto_resume_as_the_command_does(tmp_path, time_machine_path, capsys):
    """train.auto_resume: the second call finds the finished run and trains nothing; a longer
    one continues it from last.pt instead of refusing the folder."""
    settings = {**SETTINGS, "data.data_dir": str(time_machine_path.parent),
                "train.auto_resume": True}
    config, out = ROOT / "configs" / "tiny.yaml", tmp_path / "run"
    first = rnnlm.train(config, out_dir=out, quiet=True, overrides=settings)
    again = rnnlm.train(config, out_dir=out, quiet=True, overrides=settings)
    assert "has already completed train.epochs=2" in capsys.readouterr().err
    assert again.result == {} and again.metrics == first.metrics
    longer = rnnlm.train(config, out_dir=out, quiet=True, epochs=3, overrides=settings)
    assert [r["epoch"] for r in longer.metrics] == [1, 2, 3]
    assert longer.metrics[:2] == first.metrics
