"""Whether two training runs computed the same thing: their metrics.jsonl records equal with
the timing fields left out, and the weights in their last.pt and best.pt equal bit for bit.

    python scripts/same_runs.py RUN_A RUN_B [RUN_A2 RUN_B2 ...]

Used to check that a change to the code's shape changed nothing it computes: train the same
configs before and after it (same seed, same machine) and compare the pairs of out_dirs.
Prints one line per pair; exit status 1 when any pair differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

TIMING = {"tokens_per_s", "epoch_s", "wall_s"}  # how fast, not what


def records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def same_weights(a: Path, b: Path) -> bool:
    wa = torch.load(a, weights_only=True)["model"]
    wb = torch.load(b, weights_only=True)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def compare(a: Path, b: Path) -> tuple[bool, str]:
    ra, rb = records(a), records(b)
    checks = {"metrics": ra == rb}
    for name in ("last.pt", "best.pt"):
        if (a / name).exists() or (b / name).exists():
            checks[name] = (a / name).exists() and (b / name).exists() and \
                same_weights(a / name, b / name)
    last = [r for r in ra if "train_ppl" in r]
    ppl = f", final train ppl {last[-1]['train_ppl']:.6f}" if last else ""
    summary = ", ".join(f"{k} {'same' if ok else 'DIFFERENT'}" for k, ok in checks.items())
    return all(checks.values()), f"{a.name}: {len(ra)} records{ppl}; {summary}"


def main(argv: list[str]) -> int:
    if not argv or len(argv) % 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    ok = True
    for a, b in zip(argv[::2], argv[1::2]):
        same, line = compare(Path(a), Path(b))
        ok &= same
        print(line)
    print("identical" if ok else "DIFFERENT")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
