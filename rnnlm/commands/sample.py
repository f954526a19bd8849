"""`rnnlm sample` (and sample.py): generate text from a checkpoint."""

from __future__ import annotations

import argparse
import sys

SUMMARY = "generate text from a checkpoint"
DESCRIPTION = """Generate text from a checkpoint written by {train}:
{prog} --checkpoint runs/rnn_scratch/last.pt --prefix "time traveller" """


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a last.pt or best.pt")
    parser.add_argument("--prefix", help="text to start from, preprocessed as the training "
                                         "text was (default: the run's train.prefix)")
    parser.add_argument("--num-chars", type=int, default=200,
                        help="characters to generate after the prefix (default 200)")
    parser.add_argument("--temperature", type=float,
                        help="> 0; below 1 sharper, above 1 more random (default 1)")
    parser.add_argument("--top-k", type=int, help="sample only among the k most likely")
    parser.add_argument("--top-p", type=float,
                        help="sample only among the most likely characters holding this much "
                             "probability, in (0, 1]")
    parser.add_argument("--greedy", action="store_true",
                        help="always the most likely character (D2L's predict_ch8)")
    parser.add_argument("--seed", type=int, help="same seed, same text (default: random)")
    parser.add_argument("--num-samples", type=int, default=1,
                        help="independent samples, one per line (default 1)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    parser.add_argument("--unknown", choices=["error", "replace"], default="error",
                        help="prefix characters outside the vocabulary: stop with an error "
                             "(default) or read them as <unk>")


def run(args: argparse.Namespace) -> int:
    from rnnlm.checkpoint import load_checkpoint, model_from_checkpoint
    from rnnlm.config.checks import resolve_device
    from rnnlm.evaluation.sampling import SamplingOptions, encode_prefix, write_samples

    options = SamplingOptions(num_chars=args.num_chars, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, greedy=args.greedy,
                              seed=args.seed, num_samples=args.num_samples,
                              unknown=args.unknown)
    options.validate()
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint)
    model, vocab, preprocess, cfg = model_from_checkpoint(ckpt, device, args.checkpoint)
    prefix = cfg.train.prefix if args.prefix is None else args.prefix
    prefix_ids = encode_prefix(prefix, vocab, preprocess, options.unknown)
    write_samples(model, vocab, prefix_ids, options, sys.stdout)
    return 0
