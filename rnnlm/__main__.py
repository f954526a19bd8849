"""`python -m rnnlm COMMAND ...`: the `rnnlm` console command (rnnlm.cli.main)."""

from rnnlm.cli import main

if __name__ == "__main__":
    main(prog="python -m rnnlm")
