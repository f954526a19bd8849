"""Train a character-level recurrent language model: python train.py --config FILE, or
continue a saved run: python train.py --resume OUT_DIR/last.pt (the `rnnlm train` command;
its code is rnnlm/commands/train.py)."""

from rnnlm.cli import run_main, script_main

main = script_main("train")

if __name__ == "__main__":
    run_main(main)
