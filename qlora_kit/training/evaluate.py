"""Evaluation loss: mean cross-entropy per supervised token over examples, batched. The one place it is computed.

The trainer's validation loss, the FSDP path (every rank runs every batch through the sharded model),
``qlora-kit rank-sweep`` and the merge verification's ``eval_loss`` all call ``evaluate_loss``.
"""
from __future__ import annotations

import torch
from torch import nn

from qlora_kit.data.batching import collate
from qlora_kit.data.tokenize import Example
from qlora_kit.progress import progress_bar
from qlora_kit.training.loss import causal_lm_loss, supervised_count


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int, max_seq_len: int,
                  chunk_size: int = 1024, step_fn: nn.Module | None = None,
                  device: torch.device | None = None, progress: bool = False) -> float:
    """Mean cross-entropy per supervised token over ``examples``, in batches sorted by length.

    Args:
        model: a causal LM (4-bit with adapters, or plain); put in eval mode for the pass, then restored.
        examples: tokenized examples (``data.Example``) with their labels masked.
        batch_size: examples per forward pass (padded to the longest of the batch with ``pad_id``).
        max_seq_len: the collate width limit (padded batches are never truncated).
        chunk_size: rows of the LM head at a time (``training.loss_chunk_size``).
        step_fn: under FSDP, the wrapped ``SupervisedLoss`` over ``model``: every rank runs every batch
            through it (its forward gathers the sharded weights); ``device`` is then where batches go.
        progress: a progress bar with ETA over the batches.
    Returns:
        The summed token losses over the summed supervised tokens (0.0 when there are none).
    """
    runner = model if step_fn is None else step_fn
    was_training = runner.training
    runner.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, count = 0.0, 0
    for start in progress_bar(range(0, len(order), batch_size), desc="eval loss", unit="batch", enabled=progress):
        batch = collate([examples[i] for i in order[start:start + batch_size]], pad_id, False, max_seq_len)
        if step_fn is None:
            loss_sum, n = causal_lm_loss(model, batch, chunk_size)
        else:
            loss_sum, n = step_fn(**{k: v.to(device) for k, v in batch.items()}), supervised_count(batch["labels"])
        total, count = total + loss_sum.item(), count + n
    runner.train(was_training)
    return total / max(count, 1)
