"""Gradient-flow diagnostics of a checkpoint, or figures from diagnosed runs: python
diagnose.py --checkpoint PATH | --figure NAME --runs DIR ... --out PNG (the `rnnlm diagnose`
command; its code is rnnlm/commands/diagnose.py)."""

from rnnlm.cli import run_main, script_main

main = script_main("diagnose")

if __name__ == "__main__":
    run_main(main)
