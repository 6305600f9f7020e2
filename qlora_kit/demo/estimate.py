"""How long the demo will take on this machine, from two short probes timed on the loaded model.

Nothing here is a constant per machine: a training step is timed (forward and backward of one batch of the
demo's training examples through the frozen 4-bit base: the work every step repeats, without the small LoRA
share), and generation is timed on one batch of the held-out prompts with 1 and with 5 new tokens (the
difference prices a decoding step). The phases then scale by the planned work: steps, validation
passes, batches and new tokens. The probes take a few seconds and leave the model as they found it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from qlora_kit.data.batching import collate
from qlora_kit.data.tokenize import Example
from qlora_kit.inference.budget import choose_batch_size
from qlora_kit.inference.generate import encode_prompts, generate_tokens
from qlora_kit.inference.prompts import Prompt
from qlora_kit.model.fused import dense_cache_bytes
from qlora_kit.training.loss import causal_lm_loss

_DECODE_STEPS = 4  # decoding steps timed (beyond the first token) to price one step of the evaluation


@dataclass
class Estimate:
    """Expected seconds of each phase of the demo."""

    evaluation: float  # one held-out evaluation (the demo runs two: before and after training)
    training: float  # the training steps plus the validation passes inside training
    step: float  # one training step (measured: forward + backward of one batch)

    @property
    def total(self) -> float:
        return 2 * self.evaluation + self.training


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_train_step(model: nn.Module, batch: list[Example], pad_id: int, max_seq_len: int) -> tuple[float, float]:
    """Seconds of the forward and of the backward of one training batch through the frozen model.

    The backward computes the input gradients through every layer, as training's backward does for the LoRA
    adapters; the frozen weights get no gradient. The model's train/eval mode is restored.
    """
    tensors = collate(batch, pad_id, False, max_seq_len)  # [b, s] each
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():
            causal_lm_loss(model, tensors)  # warm-up: first-call allocations and kernel choice
            start = time.perf_counter()
            loss, _ = causal_lm_loss(model, tensors)
            forward = time.perf_counter() - start
            backward = _timed(loss.backward)
    finally:
        hook.remove()
        model.train(was_training)
    return forward, backward


def time_evaluation(model: nn.Module, tokenizer, prompts: list[Prompt], max_new_tokens: int) -> float:
    """Seconds ``evaluate`` is expected to take on ``prompts``: one batch timed with 1 and 1 + _DECODE_STEPS new
    tokens (their difference is the decoding steps' cost, less sensitive to noise the more steps it spans)."""
    rows = encode_prompts(tokenizer, prompts)
    size = choose_batch_size(model, max(map(len, rows)), max_new_tokens, len(rows), dense_cache_bytes(model))
    probe = prompts[:size]
    one = _timed(lambda: generate_tokens(model, tokenizer, probe, 1, size))  # prefill (+ the weight cache)
    more = _timed(lambda: generate_tokens(model, tokenizer, probe, 1 + _DECODE_STEPS, size))
    decode = max(more - one, 0.0) / _DECODE_STEPS  # one decoding step of the batch
    return math.ceil(len(prompts) / size) * (one + (max_new_tokens - 1) * decode)


def estimate_demo(model: nn.Module, tokenizer, train_set: list[Example], eval_set: list[Example],
                  eval_prompts: list[Prompt], config, max_new_tokens: int) -> Estimate:
    """The demo's expected phases on this machine; ``config`` is its TrainConfig (batch, epochs, eval_every)."""
    tc, max_len = config.training, config.data.max_seq_len
    forward, backward = time_train_step(model, train_set[:tc.batch_size], tokenizer.pad_token_id, max_len)
    steps = math.ceil(tc.epochs * (len(train_set) // tc.batch_size))
    passes = steps // tc.eval_every + (steps % tc.eval_every != 0) if tc.eval_every else 1
    per_pass = math.ceil(len(eval_set) / tc.batch_size) * forward  # validation: forwards only
    evaluation = time_evaluation(model, tokenizer, eval_prompts, max_new_tokens)
    return Estimate(evaluation, steps * (forward + backward) + passes * per_pass, forward + backward)


def minutes(seconds: float) -> str:
    """``3 min 05 s`` / ``42 s``."""
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"
