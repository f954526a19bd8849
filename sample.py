"""Generate text from a checkpoint written by train.py: python sample.py --checkpoint
runs/rnn_scratch/last.pt --prefix "time traveller" (the `rnnlm sample` command; its code
is rnnlm/commands/sample.py)."""

from rnnlm.cli import run_main, script_main

main = script_main("sample")

if __name__ == "__main__":
    run_main(main)
