"""Scoring trained checkpoints on text (`rnnlm evaluate`): their run's validation or test split,
or any text file or folder, alone or as an ensemble that averages their probabilities."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rnnlm.checkpoint import load_checkpoint, model_from_checkpoint
from rnnlm.config import Config, ConfigError
from rnnlm.data.corpus import Corpus, Vocab, load_corpus, tokenize_files
from rnnlm.data.sources import NotUtf8Error, list_source_files
from rnnlm.evaluation.evaluate import EvalResult, evaluate, evaluate_ensemble
from rnnlm.models import LanguageModel

SPLIT_LABELS = {"val": "validation", "test": "test"}


@dataclass
class Scored:
    """One checkpoint's model with what it was trained on."""
    path: str
    model: LanguageModel
    vocab: Vocab
    preprocess: str
    cfg: Config
    epoch: int | None


def load_scored(paths: list[str], device: torch.device) -> list[Scored]:
    """Every checkpoint's model; an ensemble needs one vocabulary and preprocessing."""
    scored = []
    for path in paths:
        ckpt = load_checkpoint(path)
        model, vocab, preprocess, cfg = model_from_checkpoint(ckpt, device, path)
        epoch = (ckpt.get("progress") or {}).get("epoch")  # epochs completed when written
        scored.append(Scored(path, model, vocab, preprocess, cfg, epoch))
    first = scored[0]
    for other in scored[1:]:
        if other.vocab != first.vocab or other.preprocess != first.preprocess:
            raise ConfigError(f"{other.path} has another vocabulary or preprocessing than "
                              f"{first.path}: an ensemble needs models of the same text and "
                              f"preprocessing")
    return scored


def heldout_ids(scored: list[Scored], split: str) -> tuple[np.ndarray, str]:
    """The token ids of the checkpoints' `split` ("val" or "test"), rebuilt from the data
    config saved in the first checkpoint (relative paths read from the current folder, as
    training did), and a label naming it."""
    corpus, label = heldout_corpus(scored, split)
    return getattr(corpus.splits, split), label


def heldout_corpus(scored: list[Scored], split: str) -> tuple[Corpus, str]:
    """heldout_ids' corpus, checked to hold `split` and the checkpoints' vocabulary, and the
    label of the split."""
    first = scored[0]
    data = first.cfg.data
    for other in scored[1:]:
        theirs = other.cfg.data
        if (theirs.path, theirs.split, theirs.max_tokens) != (data.path, data.split,
                                                               data.max_tokens):
            raise ConfigError(f"{other.path} was trained on another text or split than "
                              f"{first.path}: score them on a common text with --text")
    fraction = {"val": 1, "test": 2}[split]
    if data.split is None or data.split[fraction] == 0:
        raise ConfigError(f"{first.path} was trained without a {SPLIT_LABELS[split]} split "
                          f"(data.split {data.split}): score it on a text with --text PATH")
    corpus = load_corpus(data)
    if corpus.vocab != first.vocab:
        raise ConfigError(f"{corpus.source} no longer gives the vocabulary {first.path} was "
                          f"trained with (the file changed?): score it with --text instead")
    return corpus, f"{SPLIT_LABELS[split]} split of {corpus.source}"


def text_ids(path: str, vocab: Vocab, preprocess: str, unknown: str,
             encoding_errors: str = "strict") -> tuple[np.ndarray, str]:
    """A text file, or the .txt files of a folder, through the models' own preprocessing,
    as ids of their vocabulary; characters the models never saw are an error, or <unk>."""
    files = list_source_files(Path(path), given_as="--text")
    try:
        ids, own_vocab, _ = tokenize_files(files, preprocess, encoding_errors, cache_dir=None)
    except NotUtf8Error as exc:
        raise NotUtf8Error(exc.path, exc.offset, "pass --encoding-errors replace") from None
    to_model = np.array([vocab.index.get(tok, -1) for tok in own_vocab.tokens], dtype=np.int64)
    unseen = [tok for tok, i in zip(own_vocab.tokens[1:], to_model[1:], strict=True) if i < 0]
    if unseen and unknown == "error":
        listed = " ".join(repr(c) for c in unseen[:20]) + (" ..." if len(unseen) > 20 else "")
        raise ConfigError(f"{path} has characters the model never saw: {listed}; pass "
                          f"--unknown replace to score them as <unk>")
    to_model[to_model < 0] = 0  # <unk>
    return to_model[np.asarray(ids, dtype=np.int64)], f"{path} ({preprocess})"


def score(scored: list[Scored], ids: np.ndarray, lanes: int,
          device: torch.device) -> tuple[list[EvalResult], EvalResult | None]:
    """Each model's result, and the ensemble's when there are several."""
    if len(ids) < 2 * lanes:
        raise ConfigError(f"the text has {len(ids)} tokens after preprocessing; {lanes} "
                          f"lane(s) need at least {2 * lanes}")
    if len(scored) == 1:
        return [evaluate(scored[0].model, ids, lanes, device)], None
    return evaluate_ensemble([s.model for s in scored], ids, lanes, device)


def result_line(result: EvalResult, name: str) -> str:
    return f"ppl {result.ppl:8.3f}  bpc {result.bpc:6.3f}  loss {result.loss:.4f}  {name}"
