"""rnnlm: character-level recurrent language models, trained the D2L chapter-8 way.

In a notebook (the API of rnnlm/api.py):

    import rnnlm
    run = rnnlm.train("configs/lstm.yaml", epochs=50)  # model, vocab, metrics, out_dir
    print(rnnlm.generate(run, "time traveller", 100, temperature=0.8))
    model = rnnlm.load("runs/lstm/best.pt")

From a shell: `rnnlm --help` (rnnlm/cli.py, one module per command in rnnlm/commands/).

The API names are loaded on first use, so `import rnnlm` (which every command and every
submodule import does) stays free of torch.
"""

__version__ = "0.1.0"

_API = ("train", "load", "generate", "Run", "TrainedModel", "ConfigError")
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        from rnnlm import api

        return getattr(api, name)
    raise AttributeError(f"module 'rnnlm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
