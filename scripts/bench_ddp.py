"""Data-parallel scaling: tokens/s of one config run with 1, 2, ... processes under torchrun.

Every run trains the same config (same global batch, same results) through the real CLI,
`torchrun --standalone --nproc_per_node=P train.py`, with T torch threads per process (and
optionally S in-process lane shards, train.batch_shards, the one-process alternative), and
reads the per-epoch tokens/s that rank 0 logged (tokens of all ranks / slowest rank's epoch
time). The first --warmup epochs are dropped (allocator, caches, first-touch costs); the
median of the rest is reported. Measure on a quiet machine: other load distorts the ratio.

    python scripts/bench_ddp.py --config configs/rnn_scratch.yaml
    python scripts/bench_ddp.py --config configs/lstm.yaml --runs 1x1 2x1 1x1x2 --epochs 40
    python scripts/bench_ddp.py --config configs/rnn.yaml --device cuda --runs 1x1 2x1 4x1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def parse_run(spec: str) -> tuple[int, int, int]:
    """'2x1' -> (2 processes, 1 thread each, 1 shard); '1x1x2' -> 1 process, 2 shards."""
    try:
        parts = [int(part) for part in spec.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"run {spec!r} must look like PROCSxTHREADS or "
                                         f"PROCSxTHREADSxSHARDS, e.g. 2x1 or 1x1x2")
    if min(parts) < 1:
        raise argparse.ArgumentTypeError(f"run {spec!r}: every count must be >= 1")
    procs, threads, shards = (*parts, 1)[:3]
    return procs, threads, shards


def default_runs(device: str) -> list[tuple[int, int, int]]:
    if device == "cuda":
        import torch

        gpus = max(torch.cuda.device_count(), 1)
        counts = sorted({1, *(2 ** k for k in range(1, 8) if 2 ** k <= gpus), gpus})
        return [(p, 1, 1) for p in counts]
    cores = os.cpu_count() or 1
    # One process using every core (what a plain run does), one process on one core, one
    # single-threaded process per core (DDP), and one process with a lane shard per core.
    return list(dict.fromkeys([(1, cores, 1), (1, 1, 1), (cores, 1, 1), (1, 1, cores)]))


def run_once(args, procs: int, threads: int, shards: int, out_dir: Path) -> dict:
    overrides = [f"train.epochs={args.epochs}", f"train.threads={threads}",
                 f"train.batch_shards={shards}",
                 "train.predict_every=0", f"out_dir={out_dir}", *args.set]
    if args.device:
        overrides.append(f"device={args.device}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={procs}", str(ROOT / "train.py"), "--config", args.config,
           "--quiet", *(a for o in overrides for a in ("--set", o))]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: the {procs}x{threads}x{shards} run failed (exit {proc.returncode}):\n"
                 f"{proc.stderr.strip()[-2000:]}")
    records = [json.loads(line)
               for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    timed = records[args.warmup:]
    return {"procs": procs, "threads": threads, "shards": shards, "epochs_timed": len(timed),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "tokens_per_epoch": timed[-1]["tokens"], "final_train_ppl": records[-1]["train_ppl"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/rnn_scratch.yaml")
    parser.add_argument("--runs", nargs="+", type=parse_run, metavar="PROCSxTHREADS[xSHARDS]",
                        help="layouts: processes x threads per process [x in-process lane "
                             "shards] (default on CPU: 1xCORES 1x1 CORESx1 1x1xCORES; on "
                             "CUDA: 1, 2, 4, ... GPUs x 1)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="epochs left out of the median")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="override the config's device")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    if args.epochs <= args.warmup:
        parser.error(f"--epochs {args.epochs} must exceed --warmup {args.warmup}")
    runs = args.runs or default_runs(args.device or "cpu")

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_ddp.") as tmp:
        for procs, threads, shards in runs:
            name = f"{procs}x{threads}x{shards}"
            rows.append(run_once(args, procs, threads, shards, Path(tmp) / name))
            print(f"  {name}: {rows[-1]['tokens_per_s']:,.0f} tokens/s", file=sys.stderr,
                  flush=True)

    base = rows[0]["tokens_per_s"]
    print(f"{args.config}, {args.epochs} epochs ({args.warmup} warm-up), "
          f"{rows[0]['tokens_per_epoch']:,} tokens/epoch, median tokens/s after warm-up")
    print("| processes | threads/process | lane shards | tokens/s | vs first row | "
          "final train ppl |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['procs']} | {r['threads']} | {r['shards']} | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s'] / base:.2f}x | {r['final_train_ppl']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
