"""The training recipe: loop steps, evaluation, checkpoints, optimizers, loss, metrics."""
