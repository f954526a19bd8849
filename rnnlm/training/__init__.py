"""Training: one batch step (step.py: loss, autocast, batch shards), one epoch (epoch.py: D2L's
train_epoch_ch8), and the run around it (run.py: set up, resume, epochs, evaluation, the best
weights, checkpoints, the test split), with what the run drives: schedules, weight averaging,
interrupts, automatic resume, data-parallel training, CUDA graphs and perplexity plots.

May import: rnnlm.config, rnnlm.checkpoint, rnnlm.data, rnnlm.models, rnnlm.bptt,
rnnlm.kernels, rnnlm.evaluation (validation, test scores, predictions) and
rnnlm.diagnostics (the per-epoch gradient-flow record). Only the commands, the tools and
the notebook API import it.
"""
