"""Batched greedy (or sampled) generation through the 4-bit model with its active adapters.

Prompts are rendered by ``inference.prompts``, sorted by length and run in left-padded batches whose size
is chosen from memory (``inference.budget``) unless given. transformers' ``generate`` computes the prefill's
logits for the last position only (``logits_to_keep=1``); ``contiguous_head`` hands that ``[b, 1, h]`` slice
to the LM head as a contiguous tensor, because torch's bf16 CPU matmul is pathologically slow and
memory-hungry on the strided slice (a 262k-vocabulary head at b=8: 19 s and +2.9 GB, against 0.1 s).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from qlora_kit.inference.budget import choose_batch_size
from qlora_kit.inference.prompts import Prompt, render_prompt
from qlora_kit.model.fused import dense_cache_bytes, dequantized_weights

log = logging.getLogger("qlora_kit")


@dataclass
class Generation:
    """The new tokens of each prompt, in prompt order, and what producing them took."""

    tokens: list[list[int]]  # new token ids per prompt, up to and including the first end-of-sequence token
    seconds: float  # wall time of the generation loop
    batch_size: int  # prompts per batch

    @property
    def n_tokens(self) -> int:
        """Tokens generated in all (what tokens/s counts)."""
        return sum(len(t) for t in self.tokens)


@contextlib.contextmanager
def contiguous_head(model: nn.Module):
    """Inside the block the LM head receives contiguous input (a no-op for input that already is)."""
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:])) if head else None
    try:
        yield model
    finally:
        if hook is not None:
            hook.remove()


def keeps_last_logits(model: nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' generate then passes 1)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def _trim(ids: list[int], eos: set[int]) -> list[int]:
    """New tokens up to and including the first end-of-sequence token (what follows is padding)."""
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


def _left_padded(rows: list[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [b, s]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [b, s]
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def encode_prompts(tokenizer, prompts: list[Prompt]) -> list[list[int]]:
    """Token ids of each rendered prompt (the tokenizer's special tokens only where ``special_tokens``)."""
    return [list(tokenizer(p.text, add_special_tokens=p.special_tokens)["input_ids"]) for p in prompts]


def _run_batches(
    model,
    tokenizer,
    rows: list[list[int]],
    batch_size: int,
    max_new_tokens: int,
    temperature: float,
    progress: bool,
    streamer,
) -> list[list[int]]:
    """New tokens per row, rows taken longest first; returns them in the input order."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out: list[list[int]] = [[] for _ in rows]
    eos, device, sample = _eos_ids(model, tokenizer), next(model.parameters()).device, temperature > 0
    bar = tqdm(total=len(rows), desc="generate", unit="prompt", disable=not progress)
    made = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = _left_padded([rows[i] for i in chunk], tokenizer.pad_token_id, device)
        new = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            streamer=streamer,
        )
        for i, ids in zip(chunk, new[:, batch["input_ids"].shape[1] :].tolist()):  # [b, new]
            out[i] = _trim(ids, eos)
            made += len(out[i])
        bar.set_postfix(tokens=made, refresh=False)
        bar.update(len(chunk))
    bar.close()
    return out


@torch.no_grad()
def generate_tokens(
    model: nn.Module,
    tokenizer,
    prompts: list[Prompt],
    max_new_tokens: int = 64,
    batch_size: int | None = None,
    temperature: float = 0.0,
    progress: bool = False,
    dequantize_once: bool = True,
    streamer=None,
) -> Generation:
    """Generate after each rendered prompt; returns the new token ids (see ``generate`` for the settings)."""
    if not prompts:
        return Generation([], 0.0, batch_size or 1)
    if not keeps_last_logits(model):
        log.warning(
            "%s takes no logits_to_keep: the prefill computes logits for every prompt token",
            type(model).__name__,
        )
    rows = encode_prompts(tokenizer, prompts)
    was_training = model.training
    model.eval()
    reserved = dense_cache_bytes(model) if dequantize_once else 0
    batch_size = batch_size or choose_batch_size(
        model, max(map(len, rows)), max_new_tokens, len(rows), reserved
    )
    start = time.perf_counter()
    try:
        with (
            dequantized_weights(model) if dequantize_once else contextlib.nullcontext(),
            contiguous_head(model),
        ):
            tokens = _run_batches(
                model, tokenizer, rows, batch_size, max_new_tokens, temperature, progress, streamer
            )
    finally:
        model.train(was_training)
    return Generation(tokens, time.perf_counter() - start, batch_size)


def generate(
    model: nn.Module,
    tokenizer,
    prompts: list[str | list[dict] | Prompt],
    max_new_tokens: int = 64,
    batch_size: int | None = None,
    chat: bool = True,
    temperature: float = 0.0,
    progress: bool = False,
    dequantize_once: bool = True,
    system: str | None = None,
    streamer=None,
) -> list[str]:
    """Complete each prompt; returns only the new text, stripped.

    Args:
        prompts: user prompts, message lists, or ``Prompt``s from ``render_prompt``/``record_prompt``; strings
            and messages go through ``render_prompt(tokenizer, p, system, chat)``.
        batch_size: prompts per left-padded batch; None chooses it from memory (``budget.choose_batch_size``).
        temperature: 0 is greedy; above 0 samples.
        progress: a progress bar with ETA over the prompts.
        dequantize_once: dequantize each 4-bit weight once for this call (``fused.dequantized_weights``: +2
            bytes per quantized parameter in bf16 while generating, e.g. 212 MB for SmolLM2-135M); outputs
            match the normal path. False keeps memory at the packed weights.
        streamer: a transformers streamer (e.g. ``TextStreamer``) that prints tokens as they come; one prompt.
    """
    rendered = [p if isinstance(p, Prompt) else render_prompt(tokenizer, p, system, chat) for p in prompts]
    result = generate_tokens(
        model,
        tokenizer,
        rendered,
        max_new_tokens,
        batch_size,
        temperature,
        progress,
        dequantize_once,
        streamer,
    )
    return [t.strip() for t in tokenizer.batch_decode(result.tokens, skip_special_tokens=True)]
