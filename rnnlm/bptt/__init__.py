"""Backpropagation through time written out (D2L 8.7): the hand-written window backward of
the RNN (rnn.py) and of the GRU and LSTM (gated.py), checked against autograd in the tests,
and the truncation strategies that decide how far each batch backpropagates (truncation.py).

May import: rnnlm.kernels (the same loops in C or TorchScript, faster, same numbers) and
rnnlm.data.iterators (the variable-length windows). The models call into this package.
"""
