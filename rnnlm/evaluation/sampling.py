"""Text generation: warm the state on a prefix, then pick one character at a time.

Pickers turn the last step's logits into the next id: `greedy` (D2L's predict_ch8) or
`sampler` (temperature, top-k, top-p). Sampling draws on the CPU from an explicit
torch.Generator, so a seed gives the same text on every run and every device (the logits
are tiny: one row of vocabulary size per step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from rnnlm.config import ConfigError
from rnnlm.data.corpus import PREPROCESSORS, Vocab
from rnnlm.models import LanguageModel

Picker = Callable[[torch.Tensor], torch.Tensor]  # logits (N, V) -> ids (N,)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def sampler(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
            generator: torch.Generator | None = None) -> Picker:
    """Draw from softmax(logits / temperature), restricted to the `top_k` most likely ids
    and/or the smallest set of most likely ids whose probability reaches `top_p`."""

    def pick(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.detach().float().cpu()
        # Subtracting the max first keeps a tiny temperature from overflowing to inf - inf.
        logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if top_p is not None and top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=True)
            probs = ordered.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs  # of the strictly more likely ids
            ordered = ordered.masked_fill(mass_before >= top_p, -math.inf)
            logits = torch.full_like(logits, -math.inf).scatter(-1, order, ordered)
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)

    return pick


@torch.no_grad()
def generate(model: LanguageModel, prefix_ids: torch.Tensor, num_chars: int,
             pick: Picker = greedy) -> Iterator[int]:
    """Yield `num_chars` new token ids after `prefix_ids` (1-D, at least one id).

    D2L's predict_ch8 feeds the prefix one token at a time; feeding it as one window gives
    the same state (the recurrence is identical), in one call instead of len(prefix). Each
    new character then costs one step of the model's own decoder (model.decoder(); for the
    scratch models prepared weights and no autograd).
    """
    was_training = model.training
    decoder = model.decoder()  # the model's own; it puts the model in eval mode
    try:
        logits = decoder.feed(prefix_ids)  # (1, V)
        for i in range(num_chars):
            token = int(pick(logits))
            yield token
            if i + 1 < num_chars:  # no step for a character nobody will read
                logits = decoder.step(token)
    finally:
        model.train(was_training)


def predict_greedy(model: LanguageModel, vocab, prefix_ids, num_chars: int) -> str:
    """D2L's predict_ch8: the prefix followed by its greedy continuation."""
    ids = torch.as_tensor(prefix_ids, dtype=torch.long)
    new = list(generate(model, ids, num_chars))
    return vocab.decode(ids.tolist() + new)


# ---------------------------------------------------------------------------- sample.py


def flag(field: str) -> str:
    """A sampling option as `rnnlm sample` spells it: top_k -> --top-k."""
    return {"sample instead": "drop --greedy"}.get(field, "--" + field.replace("_", "-"))



@dataclass
class SamplingOptions:
    num_chars: int = 200
    temperature: float | None = None  # None: 1.0 (the model's own distribution)
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False
    seed: int | None = None  # None: different text on every run
    num_samples: int = 1
    unknown: str = "error"  # characters of the prefix outside the vocabulary: error | replace

    def validate(self, name: Callable[[str], str] | None = None) -> None:
        """Refuse options that make no sense together, in one line that names them the way
        the user gave them: `name(field)` spells a field, as a command-line flag by default
        ("top_k" -> "--top-k"); rnnlm.generate names its keywords instead."""
        name = name or flag

        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        require(self.num_chars >= 1, f"{name('num_chars')} must be >= 1, got {self.num_chars}")
        require(self.num_samples >= 1,
                f"{name('num_samples')} must be >= 1, got {self.num_samples}")
        require(self.temperature is None or (math.isfinite(self.temperature)
                                             and self.temperature > 0),
                f"{name('temperature')} must be a number > 0, got {self.temperature} "
                f"(for the most likely character every time use {name('greedy')})")
        require(self.top_k is None or self.top_k >= 1,
                f"{name('top_k')} must be >= 1, got {self.top_k}")
        require(self.top_p is None or 0.0 < self.top_p <= 1.0,
                f"{name('top_p')} must be in (0, 1], got {self.top_p}")
        require(self.unknown in ("error", "replace"),
                f"{name('unknown')} must be error or replace, got {self.unknown!r}")
        if self.greedy:
            given = [name(field) for field in ("temperature", "top_k", "top_p", "seed")
                     if getattr(self, field) is not None]
            require(not given, f"{name('greedy')} always takes the most likely character, so "
                               f"{', '.join(given)} would have no effect: drop "
                               f"{'it' if len(given) == 1 else 'them'} or "
                               f"{name('sample instead')}")

    def picker(self) -> Picker:
        if self.greedy:
            return greedy
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()  # from the OS: a fresh sample each run
        else:
            generator.manual_seed(self.seed)
        return sampler(1.0 if self.temperature is None else self.temperature, self.top_k,
                       self.top_p, generator)


def encode_prefix(prefix: str, vocab: Vocab, preprocess: str, unknown: str = "error",
                  name: Callable[[str], str] | None = None) -> list[int]:
    """The prefix through the model's own preprocessing, as ids of its vocabulary: the one
    way a prompt becomes ids, for sampling, the notebook API and the run's predictions.
    `unknown`: characters outside the vocabulary are an error, or read as <unk> ("replace").
    `name` spells the options in the messages, as SamplingOptions.validate's does."""
    name = name or flag
    text = PREPROCESSORS[preprocess](prefix)
    if not text:
        raise ConfigError(f"{name('prefix')} {prefix!r} is empty after {preprocess} "
                          f"preprocessing: give at least one character the model knows")
    try:
        return vocab.encode(text, unknown=unknown).tolist()
    except KeyError as exc:
        missing = " ".join(repr(c) for c in exc.args[0])
        raise ConfigError(f"{name('prefix')} has characters the model never saw: {missing}; "
                          f"remove them, or pass {name('unknown')} replace to read them as "
                          f"<unk>") from None


def write_samples(model: LanguageModel, vocab: Vocab, prefix_ids: list[int],
                  options: SamplingOptions, out) -> list[str]:
    """Write `num_samples` texts (prefix + continuation, one per line) to `out` character
    by character as they are generated; returns them."""
    pick = options.picker()
    ids = torch.tensor(prefix_ids, dtype=torch.long)
    head = vocab.decode(prefix_ids)
    tokens = vocab.tokens
    texts = []
    for _ in range(options.num_samples):
        out.write(head)
        out.flush()
        pieces = [head]
        for token in generate(model, ids, options.num_chars, pick):
            piece = tokens[token]
            out.write(piece)
            out.flush()
            pieces.append(piece)
        out.write("\n")
        out.flush()
        texts.append("".join(pieces))
    return texts
