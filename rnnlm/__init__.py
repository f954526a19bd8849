"""rnnlm: character-level recurrent language models, trained the D2L chapter-8 way."""

__version__ = "0.1.0"
