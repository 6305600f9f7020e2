"""How many sequences to generate at once: the memory one sequence needs, against the memory there is.

One sequence holds its KV cache at full length, the prefill's transient activations, and its share of the
vocabulary head (with ``logits_to_keep=1`` one row of logits per step, not one per prompt token). The
planner's ``Architecture`` supplies the shapes. The batch is the largest that fits in a share of the
available memory after the dequantize-once weight cache, capped, and balanced so batches are even.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from qlora_kit.config import ConfigError
from qlora_kit.hardware import available_memory
from qlora_kit.planning.models import Architecture, architecture

log = logging.getLogger("qlora_kit")

MAX_BATCH = 64  # beyond this a CPU's decode step is compute-bound: larger batches add memory, not speed
MEMORY_SHARE = 0.5  # share of the available memory generation may plan to use (the machine may be shared)


def sequence_bytes(
    arch: Architecture,
    prompt_len: int,
    new_tokens: int,
    dtype_bytes: int,
    logits_rows: int = 1,
    eager_attention: bool = False,
) -> float:
    """Peak bytes one sequence adds while generating ``new_tokens`` after a ``prompt_len``-token prompt.

    KV cache: k and v of every layer at the final length. Prefill: one layer's transients per prompt token
    (residual, norms in fp32, q/k/v, MLP gate/up/product), plus the score matrix under eager attention.
    Head: ``logits_rows`` rows of logits in the compute dtype plus three fp32 rows (transformers' copy, the
    processed scores, the argmax/softmax input): 262k vocabulary, batch 8, bf16: 29 MB planned, 29 MB measured.
    """
    cb, q, kv = dtype_bytes, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    cache = 2 * arch.layers * kv * (prompt_len + new_tokens) * cb
    cache += cache / arch.layers  # the cache update concatenates one layer into a new tensor
    prefill = prompt_len * (4 * 4 * arch.hidden + cb * (q + 2 * kv + 3 * arch.intermediate))
    if eager_attention:
        prefill += arch.heads * prompt_len * prompt_len * (4 + cb)
    head = logits_rows * arch.vocab * (cb + 3 * 4)
    return cache + prefill + head


def choose_batch_size(
    model: nn.Module, prompt_len: int, new_tokens: int, n_prompts: int, reserved: int = 0
) -> int:
    """The batch size for ``n_prompts`` prompts of at most ``prompt_len`` tokens on ``model``'s device.

    ``reserved``: bytes taken before generation starts (the dequantized weight cache). At least 1, at most
    ``MAX_BATCH`` and ``n_prompts``; batches are evened out (100 prompts at most 64: two of 50).
    """
    try:
        arch = architecture(model.config.to_dict())
    except ConfigError as e:
        log.info("generation batch size: the model config has no planner shapes (%s); using 8", e)
        return max(1, min(8, n_prompts))
    dtype = getattr(model, "qlora_compute_dtype", None) or torch.float32
    eager = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
    per_seq = sequence_bytes(arch, prompt_len, new_tokens, dtype.itemsize, eager_attention=eager)
    device = next(model.parameters()).device
    budget = MEMORY_SHARE * available_memory(device) - reserved
    fit = max(1, min(int(budget // per_seq), MAX_BATCH, n_prompts))
    batches = math.ceil(n_prompts / fit) if n_prompts else 1
    batch = math.ceil(n_prompts / batches) if n_prompts else 1
    log.debug(
        "generation batch size %d: %.1f MB per sequence, budget %.0f MB",
        batch,
        per_seq / 2**20,
        budget / 2**20,
    )
    return max(1, batch)
