"""The book presets (configs/NAME.yaml) that `rnnlm bench` compares with the D2L reference.

A module of its own, importing nothing, so that `rnnlm bench --help` lists them without
loading torch.
"""

BOOK_PRESETS = ["rnn_scratch", "rnn_scratch_random", "gru_scratch", "lstm_scratch", "rnn",
                "gru", "lstm"]
