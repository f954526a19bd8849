"""Score checkpoints on held-out text, alone and as an ensemble: python evaluate.py
--checkpoint runs/a/best.pt [--checkpoint ...] [--split test | --text PATH] (the
`rnnlm evaluate` command; its code is rnnlm/commands/evaluate.py)."""

from rnnlm.cli import run_main, script_main

main = script_main("evaluate")

if __name__ == "__main__":
    run_main(main)
