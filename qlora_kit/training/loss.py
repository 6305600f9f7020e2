"""Cross-entropy over supervised positions only, chunked so full-vocabulary logits never exist at once.

A causal LM's head turns ``[b, s, h]`` hidden states into ``[b, s, V]`` logits; at V = 128k that tensor
(plus its fp32 upcast and gradient) dwarfs the model's activations. Here only the positions that have a
label go through the head, ``chunk_size`` rows at a time, so one ``[chunk, V]`` fp32 block is alive at a time.

In training, a frozen plain ``nn.Linear`` head takes the fused path (``_LinearCrossEntropy``): each chunk's
forward also computes the loss's gradient with respect to its hidden rows (``softmax - onehot``, then one
matmul with the head) and keeps only that ``[chunk, h]`` block for backward. Against autograd through the
head plus ``cross_entropy`` under checkpointing, a step saves one head matmul, one log-softmax and one fp32
upcast per chunk, with the same numbers. Any other head (trainable, quantized, wrapped or hooked, e.g. by
FSDP) takes that checkpointed autograd path.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora_kit.data import IGNORE_INDEX


def _transform(raw: torch.Tensor, softcap: float | None, logit_scale: float
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 logits ``[n, V]`` from the head's output as the model's forward makes them (scale, then softcap),
    and ``tanh(z / softcap)`` ``[n, V]`` when softcapped (its derivative is needed by the fused path)."""
    logits = raw.float()
    if logit_scale != 1.0:
        logits = logits.mul_(logit_scale)
    if not softcap:
        return logits, None
    tanh = torch.tanh(logits.div_(softcap))
    return tanh * softcap, tanh


def _row_ce(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row CE ``[n]`` and logsumexp ``[n]`` of fp32 logits ``[n, V]``: one formula for every path, so the
    policy and the reference of DPO (grad and no-grad) get bit-identical log-probs from identical logits."""
    lse = torch.logsumexp(logits, dim=-1)  # [n]
    return lse - logits.gather(1, targets[:, None]).squeeze(1), lse


def _chunk_ce(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, softcap: float | None,
              logit_scale: float, reduction: str = "sum") -> torch.Tensor:
    """CE of one chunk: hidden ``[n, h]``, targets ``[n]`` -> 0-dim (``"sum"``) or ``[n]`` (``"none"``) fp32."""
    ce, _ = _row_ce(_transform(head(hidden), softcap, logit_scale)[0], targets)
    return ce.sum() if reduction == "sum" else ce


def _supervised_rows(hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden rows ``[n, h]`` that predict a label, their targets ``[n]`` and the mask ``[b, s-1]`` choosing them."""
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on [batch, seq]")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    targets = labels[:, 1:]  # [b, s-1]
    mask = targets != IGNORE_INDEX  # [b, s-1]
    return hidden[:, :-1][mask], targets[mask].to(torch.long), mask  # [n, h], [n], [b, s-1]


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-row CE of ``softcap(scale * (h W^T + b))`` against targets, its input gradient computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, logit_scale):
        logits, tanh = _transform(F.linear(hidden, weight, bias), softcap, logit_scale)  # [n, V]
        loss, lse = _row_ce(logits, targets)  # [n]
        grad = logits.sub_(lse[:, None]).exp_()  # softmax [n, V], in place
        grad[torch.arange(len(targets), device=targets.device), targets] -= 1.0  # d loss_i / d logit_i
        if tanh is not None:
            grad.mul_(1.0 - tanh * tanh)
        if logit_scale != 1.0:
            grad.mul_(logit_scale)
        ctx.save_for_backward(grad.to(hidden.dtype) @ weight)  # d loss_i / d hidden_i  [n, h]
        return loss

    @staticmethod
    def backward(ctx, g):  # g [n]: the upstream gradient of each row's loss
        (d_hidden,) = ctx.saved_tensors
        return d_hidden * g[:, None].to(d_hidden.dtype), None, None, None, None, None


def _fusable(head: nn.Module, rows: torch.Tensor) -> bool:
    """True when the head is a frozen plain ``nn.Linear`` called without hooks, in grad mode."""
    return (torch.is_grad_enabled() and rows.requires_grad and type(head) is nn.Linear
            and not head.weight.requires_grad and type(head.weight.data) is torch.Tensor
            and not head._forward_hooks and not head._forward_pre_hooks)


def _chunks(rows: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk_size: int, softcap: float | None,
            logit_scale: float, reduction: str) -> Iterator[torch.Tensor]:
    """``_chunk_ce`` over ``chunk_size`` rows at a time: fused for a frozen plain head in grad mode, else each
    chunk under activation checkpointing when grads are on."""
    fused = _fusable(head, rows)
    use_checkpoint = torch.is_grad_enabled()
    for start in range(0, len(rows), chunk_size):
        h, y = rows[start:start + chunk_size], targets[start:start + chunk_size]  # [c, h], [c]
        if fused:
            part = _LinearCrossEntropy.apply(h, head.weight, head.bias, y, softcap, logit_scale)  # [c]
            yield part.sum() if reduction == "sum" else part
        elif use_checkpoint:
            yield checkpoint(_chunk_ce, h, y, head, softcap, logit_scale, reduction, use_reentrant=False)
        else:
            yield _chunk_ce(h, y, head, softcap, logit_scale, reduction)


def supervised_count(labels: torch.Tensor) -> int:
    """How many next-token targets a ``[b, s]`` label batch holds (``labels[:, 1:]`` not IGNORE_INDEX)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def supervised_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk_size: int = 1024,
                    softcap: float | None = None, logit_scale: float = 1.0) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over the supervised positions, and how many there are.

    Args:
        hidden: ``[b, s, h]`` last hidden states of the decoder backbone (after its final norm).
        labels: ``[b, s]`` unshifted token ids (HF convention: position t predicts ``labels[t + 1]``);
            IGNORE_INDEX marks positions that are not trained on.
        head: the LM head (``model.get_output_embeddings()``), applied to ``chunk_size`` rows at a time.
        softcap: tanh soft-capping of the logits (Gemma-2's ``final_logit_softcapping``); None disables it.
        logit_scale: multiply the logits by this before softcapping (Cohere's ``logit_scale``;
            Granite's 1 / ``logits_scaling``).
    Returns:
        ``(loss_sum, n)``: a 0-dim fp32 tensor attached to the graph (0 when n == 0) and the supervised count.
        Divide the sum of ``loss_sum`` over micro-batches by the sum of ``n`` for a correctly normalised mean.
    Raises:
        ValueError if the shapes disagree or ``chunk_size`` < 1.
    """
    rows, targets, _ = _supervised_rows(hidden, labels, chunk_size)
    n = len(targets)
    if n == 0:
        return hidden[:, :0].float().sum(), 0  # exact 0, still connected to the graph
    total = hidden.new_zeros((), dtype=torch.float32)
    for part in _chunks(rows, targets, head, chunk_size, softcap, logit_scale, "sum"):
        total = total + part
    return total, n


def token_log_probs(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk_size: int = 1024,
                    softcap: float | None = None, logit_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every supervised next token, chunked as ``supervised_loss`` is.

    Same arguments as ``supervised_loss``. Returns ``(logps, mask)``: ``logps`` ``[n]`` fp32 in row-major
    order of the positions ``mask`` ``[b, s-1]`` selects (position t of ``mask`` is label t + 1).
    """
    rows, targets, mask = _supervised_rows(hidden, labels, chunk_size)
    if len(targets) == 0:
        return hidden[:, :0].float().sum(dim=(0, 1))[:0], mask  # [0], still connected to the graph
    return -torch.cat(list(_chunks(rows, targets, head, chunk_size, softcap, logit_scale, "none"))), mask


def _logit_transform(config) -> tuple[float | None, float]:
    """(softcap, scale) applied by the model's ``*ForCausalLM.forward`` after its head, read from the config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = float(getattr(text, "logit_scale", None) or 1.0)  # Cohere multiplies
    if getattr(text, "logits_scaling", None):  # Granite divides
        scale /= float(text.logits_scaling)
    return softcap, scale


def backbone_hidden(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder backbone's last hidden states ``[b, s, h]`` for a collated batch, and its labels ``[b, s]``
    on the same device.

    ``batch`` holds ``input_ids`` and ``labels`` ``[b, s]`` and optionally ``attention_mask`` (padded batches)
    or ``position_ids`` (packed batches, no attention_mask: transformers then keeps attention inside each
    packed example).
    """
    device = next(model.parameters()).device
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    out = model.base_model(**inputs, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [b, s, h]
    return hidden, batch["labels"].to(device)


def head_kwargs(model: nn.Module) -> dict:
    """``head``, ``softcap`` and ``logit_scale`` of the model's LM head, for ``supervised_loss``/``token_log_probs``."""
    softcap, scale = _logit_transform(model.config)
    return {"head": model.get_output_embeddings(), "softcap": softcap, "logit_scale": scale}


def causal_lm_loss(model: nn.Module, batch: dict, chunk_size: int = 1024) -> tuple[torch.Tensor, int]:
    """Run the decoder backbone on a collated batch (see ``backbone_hidden``), then ``supervised_loss`` through
    the model's LM head. Returns ``(loss_sum, n_supervised)`` as ``supervised_loss`` does."""
    hidden, labels = backbone_hidden(model, batch)
    return supervised_loss(hidden, labels, chunk_size=chunk_size, **head_kwargs(model))
