"""Training: the per-worker loop, checkpoints, evaluation, local and Ray Train runners."""
