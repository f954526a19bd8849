"""Gradient flow made visible (D2L 8.7's "why gradients vanish or explode"): ||dL/dh_t|| against
distance, the eigenvalues of W_hh (all of them, over training, for the diagonal recurrences),
truncation patterns (gradients.py), their per-run record and report (report.py) and figures
(plots.py).

May import: rnnlm.config, rnnlm.checkpoint, rnnlm.data, rnnlm.models, rnnlm.bptt, and the
bottom modules rnnlm.errors and rnnlm.files (safe writes).
Never rnnlm.training: the run drives the recorder.
"""
