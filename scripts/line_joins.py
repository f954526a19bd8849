"""What the line joins of `d2l` preprocessing cost a trained model on its validation split.

D2L 0.17 cleans each line and concatenates the lines with no separator, so the last word of a
line runs into the first word of the next (`wells` + `the` -> `wellsthe`), about once every
60 characters, and nothing left in the text says where a line ended. This scores a `d2l`
checkpoint on its run's validation (or test) split in one lane with the state carried (as
training validates with data.eval_lanes: 1), and splits the loss by where the predicted
character sits:

    python scripts/line_joins.py --checkpoint runs/heldout_lstm_tuned/best.pt [--split test]

It prints the loss at the joins (the first letter of a line, which follows the previous line's
last letter directly), at the first letter of other words, at spaces and elsewhere; the share
of the loss spent at the joins; and, for every word end, how likely the model found the line
to end there against how often it did, by the word end's position in its line.
"""

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rnnlm.cli import run_main  # noqa: E402

POSITION_BINS = (0, 40, 55, 62, 68, 1_000_000)  # lines of the Time Machine hold ~60 tokens


def line_starts(files, total: int, whole: bool):
    """Token offsets where a line other than the first begins, in the d2l stream of `total`
    tokens (`whole`: all of the text; else data.max_tokens cut the stream's tail off)."""
    import numpy as np

    from rnnlm.data.corpus import DataError, preprocess_d2l

    starts, offset = [], 0
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                length = len(preprocess_d2l(line))
                if length:
                    if offset:
                        starts.append(offset)
                    offset += length
    if offset < total or (whole and offset != total):
        raise DataError(f"the lines of the text give {offset} tokens, its token ids {total}: "
                        f"has the text changed since training?")
    return np.array(starts, dtype=np.int64)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a best.pt or last.pt of a run "
                        "with d2l preprocessing and a held-out split")
    parser.add_argument("--split", choices=["val", "test"], default="val")
    args = parser.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F

    from rnnlm.config import ConfigError
    from rnnlm.data.corpus import corpus_files
    from rnnlm.evaluation.scoring import heldout_corpus, load_scored

    torch.set_num_threads(1)
    scored = load_scored([args.checkpoint], torch.device("cpu"))[0]
    if scored.preprocess != "d2l":
        raise ConfigError(f"{args.checkpoint} was trained with data.preprocess="
                          f"{scored.preprocess!r}: only d2l joins lines without a separator")
    corpus, label = heldout_corpus([scored], args.split)
    ids = getattr(corpus.splits, args.split)
    data = scored.cfg.data
    n_train = len(corpus.splits.train)
    first = n_train if args.split == "val" else n_train + len(corpus.splits.val)

    tokens = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    model = scored.model
    with torch.no_grad():
        logits, _ = model(tokens[:-1].unsqueeze(0), model.begin_state(1))
    log_probs = F.log_softmax(logits[:, 0].double(), dim=-1)
    targets = tokens[1:]
    loss = -log_probs.gather(1, targets[:, None])[:, 0].numpy()
    space = scored.vocab.index.get(" ")
    if space is None:
        raise ConfigError(f"{args.checkpoint}'s vocabulary has no space: there are no word "
                          f"ends to look at")
    p_space = log_probs[:, space].exp().numpy()

    # Prediction i predicts stream token first + 1 + i from the tokens before it.
    starts = line_starts(corpus_files(data), len(corpus.ids), whole=data.max_tokens is None)
    predicted = np.arange(first + 1, first + len(ids))
    is_join = np.isin(predicted, starts)
    if not is_join.any():
        raise ConfigError(f"the {label} has no line joins: nothing to measure")
    is_space = targets.numpy() == space
    after_space = np.r_[ids[0] == space, is_space[:-1]]
    word_start = after_space & ~is_join
    other = ~is_join & ~is_space & ~word_start
    # The line of the token before each prediction, and how many of its tokens come
    # before the predicted one (for a join: the length of the line that just ended).
    line = np.searchsorted(starts, predicted - 1, side="right")
    begins = np.r_[0, starts][line]
    position = predicted - begins

    n = len(loss)
    print(f"{args.checkpoint}: {label}, {n:,} predictions, {int(is_join.sum())} line joins "
          f"(one every {n / is_join.sum():.0f} characters)")
    print(f"mean loss (nats): line joins {loss[is_join].mean():.3f}, other word starts "
          f"{loss[word_start].mean():.3f}, spaces {loss[is_space].mean():.3f}, "
          f"other letters {loss[other].mean():.3f}")
    share = loss[is_join].sum() / loss.sum()
    as_word_starts = loss.copy()
    as_word_starts[is_join] = loss[word_start].mean()
    print(f"the joins hold {100 * share:.1f}% of the loss: perplexity "
          f"{math.exp(loss.mean()):.3f}, {math.exp(as_word_starts.mean()):.3f} if each join "
          f"cost what another word start costs")
    print("at each word end (the next character is a space or a join), by the number of "
          "tokens of its line before the next character:")
    word_end = is_space | is_join
    for lo, hi in zip(POSITION_BINS[:-1], POSITION_BINS[1:], strict=True):
        sel = word_end & (position >= lo) & (position < hi)
        if sel.any():
            span = f"{lo}-{hi - 1}" if hi < POSITION_BINS[-1] else f"{lo}+"
            print(f"  {span:>6}: {int(sel.sum()):5d} word ends, line ended at "
                  f"{100 * is_join[sel].mean():5.1f}%, model's P(no space) "
                  f"{100 * (1 - p_space[sel]).mean():5.1f}%")
    return 0


if __name__ == "__main__":
    run_main(main)
