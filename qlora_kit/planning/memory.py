"""The memory planner: will this QLoRA fine-tune fit, and which knob makes it fit?

Works from a config.json alone (a dict, a path, a checkpoint folder, or a shipped name such as
"llama-3.1-70b"), so a 70B plan takes milliseconds. ``planning.models`` reads the shapes, ``planning.estimate``
derives each item's bytes and the peak moment, ``planning.verdict`` judges a plan against a budget; this
module is the public entry, ``plan_memory``, and the table it prints.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.config import ConfigError, QuantConfig
from qlora_kit.planning.estimate import Parts, PlanSettings, alternative_optimizer, gib, peak
from qlora_kit.planning.models import architecture
from qlora_kit.planning.verdict import judge


@dataclass
class Row:
    """One line of the memory table."""

    item: str  # what the bytes are
    bytes: float  # bytes under the chosen settings
    at_peak: float  # of which alive at the peak moment
    alternative: str  # the same item under the other setting, e.g. "no double quant: 3.9 GiB"


@dataclass
class MemoryPlan:
    """A memory plan for one QLoRA fine-tune on one device."""

    model: str  # shipped name or model_type
    settings: dict  # every setting the plan assumed
    rows: list[Row]  # the table
    peak_moment: str  # when the peak happens: "loss backward", "layer backward" or "optimizer step"
    total: float  # bytes: the predicted peak per device, framework overhead included
    overhead: float  # bytes: the framework overhead inside ``total``
    spillable: float  # bytes of paged optimizer state that can move to host memory under pressure
    device_memory: float | None  # bytes available per device, if given
    fits: bool | None  # total <= device_memory (None when no device_memory was given)
    max_batch: int | None  # largest batch that fits at seq_len (0: none)
    max_seq_len: int | None  # largest sequence length (multiple of 64) that fits at batch
    advice: str  # what is spare, what pages out, or the cheapest change that makes it fit
    params: int = 0  # model parameters
    lora_params: int = 0  # trainable LoRA parameters

    def __str__(self) -> str:
        return format_plan(self)


def _rows(p: Parts, s: PlanSettings, at: tuple[float, float, float, float], overhead: float) -> list[Row]:
    """The memory table: one row per item, with its bytes, its bytes at the peak, and the other setting's bytes."""
    quant, ckpt, chunked = s.quant, s.grad_checkpointing, s.chunked_loss
    opt_alt = alternative_optimizer(s.optimizer)
    weights = (f"4-bit weights ({quant.quant_type}{' + double quant' if quant.double_quant else ''})"
               if quant.bits == 4 else f"{quant.bits}-bit weights")
    if s.offload != "none":
        weights += f", {s.offload}-offloaded: {min(2, p.layers)} of {p.layers} layers resident"
    return [
        Row(weights, p.w4, p.w4, f"{'without' if quant.double_quant else 'with'} double quant: {gib(p.w4_alt)}"),
        Row("unquantized params (embeddings, head, norms)", p.unq, p.unq, ""),
        Row(f"LoRA params (r={s.rank}, {p.lora_params / 1e6:.1f}M, fp32)", p.lora, p.lora, ""),
        Row("LoRA gradients (fp32)" + (" + DDP buckets" if p.ddp_bucket else ""), p.grads + p.ddp_bucket,
            at[1] + p.ddp_bucket, "allocated during backward"),
        Row(f"optimizer states ({s.optimizer})", p.opt, p.opt, f"{opt_alt}: {gib(p.opt_alt)}"),
        Row(f"activations ({'checkpointed' if ckpt else 'no checkpointing'}, {s.attention})", p.acts, at[0],
            f"{'without' if ckpt else 'with'} checkpointing: {gib(p.acts_alt)}"),
        Row(f"loss over the vocabulary ({'chunked' if chunked else 'unchunked'})", p.loss, at[2],
            f"{'unchunked' if chunked else 'chunked'}: {gib(p.loss_alt)}"),
        Row("transients (recompute, backward buffers, dequant)", p.recompute + p.transient,
            at[3], ""),
        Row(f"framework overhead ({s.device})", overhead, overhead,
            "torch + transformers + bitsandbytes runtime" if s.device == "cpu" else "CUDA context + workspaces"),
    ]


def parse_bytes(text: str | float | None) -> float | None:
    """"24GB", "24GiB", "80 G", "16000MB", "512B" -> bytes (GB means GiB: a "24 GB" card has 24 GiB).

    A number (int or float) is bytes; a string must carry its unit, so "16" is a ConfigError rather than
    16 bytes. None stays None.
    """
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    m = re.fullmatch(r"\s*([\d.]+)\s*(?:([KMGT])i?B?|(B))\s*", str(text), re.IGNORECASE)
    if not m:
        hint = f"add a unit, e.g. {text.strip()}GB" if re.fullmatch(r"\s*[\d.]+\s*", str(text)) else \
            "write a size such as 24GB, 80GiB or 16000MB"
        raise ConfigError(f"device_memory {text!r}: {hint} (GB means GiB, as on GPU spec sheets)")
    return float(m.group(1)) * 1024 ** "BKMGT".index((m.group(2) or "B").upper())


def plan_memory(model_or_config: str | Path | dict, seq_len: int = 2048, batch: int = 1, rank: int = 16,
                targets: str | list[str] = "all-linear", optimizer: str = "paged_adamw_8bit",
                grad_checkpointing: bool = True, device_memory: str | float | None = None,
                quant: QuantConfig | None = None, compute_dtype: str = "bf16", chunked_loss: bool = True,
                devices: int = 1, strategy: str = "single", device: str = "cuda", attention: str | None = None,
                loss_chunk: int = 1024, supervised_fraction: float = 1.0, offload: str = "none") -> MemoryPlan:
    """Predict the peak memory per device of a QLoRA fine-tune, without loading any weight.

    Args:
        model_or_config: a config.json dict or path, a checkpoint folder, or a shipped name (``shipped_configs()``).
        seq_len, batch: tokens per sequence and sequences per optimizer micro-step.
        rank, targets: LoRA rank and target linears ("all-linear" or names such as ["q_proj", "v_proj"]).
        optimizer: a name of ``qlora_kit.optimizers.OPTIMIZERS`` ("adamw", "adamw_8bit", "paged_adamw_8bit", ...).
        grad_checkpointing: recompute each decoder layer in backward instead of storing its activations.
        device_memory: memory per device: a size with its unit ("24GB", "80GiB"; GB means GiB) or a number of
            bytes; enables the verdict.
        quant: 4-bit settings (NF4 + double quant by default).
        compute_dtype: "bf16", "fp16" or "fp32" (activations, unquantized weights, dequantized matmuls).
        chunked_loss: qlora-kit's loss over supervised positions in chunks, vs HF's full-vocabulary logits.
        devices, strategy: "single"; "ddp" (each device holds everything, plus a gradient bucket);
            "fsdp" (weights and LoRA state divided by ``devices``; activations are not).
        device: "cuda" or "cpu": which framework overhead to add.
        attention: "sdpa" (default) or "eager" (default for Gemma 2, whose soft-capped scores SDPA can't do).
        loss_chunk, supervised_fraction: chunk size in tokens and the share of tokens that carry labels.
        offload: "none", or "cpu"/"disk" (``model.offload``): only two decoder layers' 4-bit weights are resident.
    Returns:
        a MemoryPlan; ``str(plan)`` is the table and verdict.
    Raises:
        ConfigError naming the bad setting.
    """
    arch = architecture(model_or_config)
    s = PlanSettings(seq_len=int(seq_len), batch=int(batch), rank=int(rank), targets=targets, optimizer=optimizer,
                     grad_checkpointing=bool(grad_checkpointing), quant=quant or QuantConfig(),
                     compute_dtype=compute_dtype, chunked_loss=bool(chunked_loss), devices=int(devices),
                     strategy=strategy, device=device, attention=attention or ("eager" if arch.attn_softcap else "sdpa"),
                     loss_chunk=int(loss_chunk), supervised_fraction=float(supervised_fraction),
                     offload=offload).validate()
    parts, top = peak(arch, s)
    budget = parse_bytes(device_memory)
    v = judge(arch, s, budget) if budget is not None else None
    return MemoryPlan(model=arch.name, settings=dataclasses.asdict(s), rows=_rows(parts, s, top.alive, top.overhead),
                      peak_moment=top.moment, total=top.total, overhead=top.overhead, spillable=top.spill,
                      device_memory=budget, fits=v.fits if v else None, max_batch=v.max_batch if v else None,
                      max_seq_len=v.max_seq_len if v else None, advice=v.advice if v else "",
                      params=arch.params, lora_params=parts.lora_params)


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a text table followed by the verdict."""
    s = plan.settings
    head = (f"{plan.model} ({plan.params / 1e9:.2f}B params): seq_len {s['seq_len']}, batch {s['batch']}, "
            f"rank {s['rank']} ({s['targets']}), {s['optimizer']}, checkpointing "
            f"{'on' if s['grad_checkpointing'] else 'off'}, {s['compute_dtype']} compute, "
            f"{s['devices']} device(s) {s['strategy']}")
    lines = [head, f"{'item':<62}{'size':>11}{'at peak':>11}  note", "-" * 100]
    for r in plan.rows:
        lines.append(f"{r.item:<62}{gib(r.bytes):>11}{gib(r.at_peak):>11}  {r.alternative}")
    lines.append("-" * 100)
    lines.append(f"{'peak per device (at the ' + plan.peak_moment + ')':<62}{'':>11}{gib(plan.total):>11}")
    if plan.spillable:
        lines.append(f"paged optimizer: {gib(plan.spillable)} of it can move to host memory, "
                     f"so the hard floor is {gib(plan.total - plan.spillable)}")
    if plan.device_memory is not None:
        paging = not plan.fits and plan.total - plan.spillable <= plan.device_memory
        word = "FITS" if plan.fits else "FITS WITH PAGING" if paging else "DOES NOT FIT"
        lines.append(f"verdict: {word} in {gib(plan.device_memory)} (peak {gib(plan.total)}): {plan.advice}")
        lines.append(f"largest batch at seq_len {s['seq_len']}: {plan.max_batch}; "
                     f"largest seq_len at batch {s['batch']}: {plan.max_seq_len}")
    return "\n".join(lines)
