"""What each speedrun lever buys: training tokens/s of the held-out LSTM under each
configuration on the way from heldout_lstm_spaced to speedrun, and the two per-update costs
that were code changes rather than settings, in rounds taken in turns.

    python scripts/speedrun_levers.py                 # 3 rounds of 24 batches each
    python scripts/speedrun_levers.py --rounds 5 --batches 40

Each row runs the trainer's own pieces (the model, batches, optimizer, train_epoch with the
weight average updated after every step, as a run does) on the training split for --batches
batches after 3 warm-up batches, under the row's settings, and reports tokens/s as the median
over rounds. Then, on the same machine, the two pieces measured alone: PyTorch's bernoulli_
masks (what F.dropout draws) against base.keep_mask's, and the foreach AdamW step against the
fused one, on the model's 3.3M weights (medians of 10).
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch

from rnnlm.config import load_config
from rnnlm.data.corpus import load_corpus
from rnnlm.data.iterators import BatchIterator
from rnnlm.models import build_model
from rnnlm.models.base import keep_mask
from rnnlm.tools.bench import median_seconds, time_training_steps
from rnnlm.training.run import make_optimizer, seed_everything

OLD, NEW = "configs/heldout_lstm_spaced.yaml", "configs/speedrun.yaml"
# (label, config, overrides): each row adds one change to the row above it
ROWS = [
    ("heldout_lstm_spaced on PyTorch's layer (4 x 64, fp32, 1 thread)", OLD,
     ["model.cell_kernel=torch"]),
    ("  + the C windows (its default now)", OLD, []),
    ("  + 32 lanes x 32 steps", OLD, ["data.batch_size=32", "data.num_steps=32"]),
    ("  + 2 threads", OLD, ["data.batch_size=32", "data.num_steps=32", "train.threads=2"]),
    ("  + bf16 (= speedrun)", NEW, []),
    ("speedrun on 1 thread", NEW, ["train.threads=1"]),
]


def tokens_per_s(config: str, overrides: list[str], batches: int) -> float:
    cfg = load_config(config, overrides)
    seed_everything(cfg.seed)
    corpus = load_corpus(cfg.data)
    model = build_model(cfg.model, len(corpus.vocab), cfg.train)
    optimizer = make_optimizer(cfg, model)
    data = BatchIterator(corpus.splits.train, cfg.data.batch_size, cfg.data.num_steps,
                         cfg.data.iterator, seed=cfg.seed)
    warm, batch_list = 3, list(itertools.islice(data.epoch(0), 3 + batches))
    seconds = time_training_steps(cfg, model, optimizer, batch_list, warm)
    return batches * cfg.data.batch_size * cfg.data.num_steps / seconds


def piece_costs() -> list[tuple[str, float, float]]:
    """(what, old ms, new ms), one thread."""
    torch.set_num_threads(1)
    x = torch.ones(1 << 20)
    masks = (1e3 * median_seconds(lambda: torch.empty_like(x).bernoulli_(0.7), 10),
             1e3 * median_seconds(lambda: keep_mask(x.shape, 0.3, x), 10))
    cfg = load_config(NEW, [])
    model = build_model(cfg.model, 28, cfg.train)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    foreach = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    fused = make_optimizer(cfg, model)
    steps = (1e3 * median_seconds(foreach.step, 10), 1e3 * median_seconds(fused.step, 10))
    return [("dropout mask of 2^20 elements: bernoulli_ / keep_mask", *masks),
            ("AdamW step on the model's weights: foreach / fused", *steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=24)
    args = parser.parse_args()
    speeds: dict[str, list[float]] = {label: [] for label, _, _ in ROWS}
    for _ in range(args.rounds):
        for label, config, overrides in ROWS:
            speeds[label].append(tokens_per_s(config, overrides, args.batches))
    first = statistics.median(speeds[ROWS[0][0]])
    print(f"torch {torch.__version__}; {args.rounds} rounds of {args.batches} batches, "
          "rows in turns; median tokens/s (range)\n")
    print("| configuration | tokens/s | range | vs first row |\n|---|---:|---:|---:|")
    for label, values in speeds.items():
        median = statistics.median(values)
        print(f"| {label.strip()} | {median:,.0f} | {min(values):,.0f}-{max(values):,.0f} | "
              f"{median / first:.2f}x |")
    print("\n| piece (one thread) | before, ms | now, ms | ratio |\n|---|---:|---:|---:|")
    for what, old, new in piece_costs():
        print(f"| {what} | {old:.1f} | {new:.1f} | {old / new:.1f}x |")


if __name__ == "__main__":
    main()
