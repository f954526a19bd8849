"""Compare variants of one config: python compare.py --config FILE --vary KEY=V1,V2 [...]
(the `rnnlm compare` command; its code is rnnlm/commands/compare.py)."""

from rnnlm.cli import run_main, script_main

main = script_main("compare")

if __name__ == "__main__":
    run_main(main)
