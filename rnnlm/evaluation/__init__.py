"""Using trained models: held-out evaluation and ensembles (evaluate.py), scoring checkpoints on
any text (scoring.py) and text generation (sampling.py).

May import: rnnlm.config, rnnlm.checkpoint, rnnlm.data, rnnlm.models. Never rnnlm.training:
the run calls this package to validate and predict.
"""
