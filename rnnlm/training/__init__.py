"""Training: one batch step (step.py: loss, autocast, batch shards), one epoch (epoch.py: D2L's
train_epoch_ch8), and the run around it (run.py: set up, resume, one epoch, end of epoch,
finish), with what the run drives: the best so far (best.py: best metric, early stopping, best
weights), the metrics log (metrics.py), schedules, weight averaging, interrupts, divergence
(divergence.py: a NaN stops the run), automatic resume, data-parallel training, CUDA graphs
and perplexity plots.

May import: rnnlm.config, rnnlm.checkpoint, rnnlm.data, rnnlm.models, rnnlm.bptt,
rnnlm.kernels, rnnlm.errors, rnnlm.files (safe writes, the out_dir lock), rnnlm.evaluation
(validation, test scores, predictions) and rnnlm.diagnostics (the per-epoch gradient-flow
record). Only the commands, the tools and the notebook API import it.
"""
