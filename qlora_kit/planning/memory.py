"""The memory planner: will this QLoRA fine-tune fit, and which knob makes it fit?

Works from a config.json alone (a dict, a path, a checkpoint folder, or a shipped name such as
"llama-3.1-70b"), so a 70B plan takes milliseconds. Every figure is derived from the block's tensors:

* 4-bit weights: n/2 bytes of codes plus one absmax per 64 weights (fp32, or 8-bit with double quantization
  plus one fp32 scale per 256 absmax); unquantized parameters (embeddings, an untied head, norms, biases)
  in the compute dtype, as ``load_model`` loads them.
* LoRA: r·(in+out) per adapted linear, kept in fp32 by ``add_lora``; gradients the same; AdamW holds two fp32
  moments (8 bytes/param), AdamW8bit two uint8 moments plus one fp32 absmax per 256 (tensors under 4096
  elements stay 32-bit, as in bitsandbytes). Paged states are counted on the device, and the verdict says how
  much of them can spill to host memory.
* Activations: the tensors autograd saves for one Llama/Mistral/Qwen2/Gemma-style decoder layer, derived in
  ``saved_per_token`` below; with checkpointing only each layer's input is kept and one layer is recomputed.
* The loss: unchunked (``model(..., labels=...)``) the head's logits in the compute dtype, the fp32 upcast and
  fp32 log-probabilities exist in forward, and in backward the saved log-probs, their gradient and the
  logits' gradient (3 x 4 bytes per token per vocabulary entry); chunked, one chunk of fp32 logits and its
  gradient plus the supervised tokens' hidden states and their gradient.
* The peak is the static memory (weights, LoRA parameters, optimizer states, framework) plus the largest of
  three moments: the loss backward (every saved activation alive, no LoRA gradient yet), a decoder layer's
  backward (activations partly freed, gradients partly allocated), and the optimizer step (all gradients).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.config import ConfigError, QuantConfig

CONFIG_DIR = Path(__file__).parent / "configs"
GiB = 2**30
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
# Framework overhead (bytes, per device). CUDA: the context with lazily loaded kernels (~0.3-0.5 GB), cuBLAS
# workspaces and the caching allocator's slack, together about 1 GiB in nvidia-smi for a training process.
# CPU: RssAnon of a process after importing torch, transformers, bitsandbytes and the model's code and running
# a first matmul (measured here: 273 MB after the imports, about 300 MB initialised).
FRAMEWORK_OVERHEAD = {"cuda": 1 * GiB, "cpu": 300 * 2**20}
_GATED_ACTS = ("silu", "swish", "gelu_pytorch_tanh", "gelu_new", "gelu")


@dataclass
class Architecture:
    """The shapes that set a decoder-only model's memory, read from its config.json."""

    name: str  # shipped name or model_type
    model_type: str  # "llama", "mistral", "qwen2", "gemma2"...
    hidden: int  # hidden_size
    intermediate: int  # intermediate_size of the MLP
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads (GQA when fewer than heads)
    head_dim: int  # per-head width (Gemma 2 9B: 256, not hidden / heads)
    vocab: int  # vocab_size
    tied: bool  # tie_word_embeddings: the LM head shares the embedding matrix
    gated_mlp: bool  # SwiGLU/GeGLU (gate, up, down) rather than a two-matrix GELU MLP
    norms_per_layer: int  # RMSNorms inside a block (2 for Llama, 4 for Gemma 2)
    qkv_bias: bool  # q/k/v projections carry biases (Qwen2)
    final_softcap: bool  # logits are soft-capped with tanh (Gemma 2)
    attn_softcap: bool  # attention scores are soft-capped (Gemma 2; forces eager attention in transformers)

    def linears(self) -> dict[str, tuple[int, int]]:
        """Per-layer linear layers: name -> (in_features, out_features)."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        attn = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        mlp = {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)} if self.gated_mlp else \
            {"up_proj": (h, i), "down_proj": (i, h)}
        return {**attn, **mlp}

    @property
    def params(self) -> int:
        """Total parameters (embeddings and head counted once when tied)."""
        block = sum(a * b for a, b in self.linears().values()) + self.norms_per_layer * self.hidden
        return self.layers * block + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


def shipped_configs() -> list[str]:
    """Names of the model configs shipped in qlora_kit/configs (e.g. "llama-3.1-70b")."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def read_config(model_or_config: str | Path | dict) -> dict:
    """A config.json dict from a dict, a config.json path, a checkpoint folder or a shipped name."""
    if isinstance(model_or_config, dict):
        return model_or_config
    text = str(model_or_config)
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
    elif not path.exists() and (CONFIG_DIR / f"{text.lower()}.json").is_file():
        path = CONFIG_DIR / f"{text.lower()}.json"
    if not path.is_file():
        raise ConfigError(f"model {text!r}: not a config.json, a checkpoint folder or a shipped config; "
                          f"shipped: {', '.join(shipped_configs())}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} line {e.lineno}: invalid JSON: {e.msg}") from None


def architecture(model_or_config: str | Path | dict) -> Architecture:
    """Parse the shapes the planner needs; ConfigError names a missing field."""
    cfg = read_config(model_or_config)
    cfg = {**cfg.get("text_config", {}), **cfg} if "hidden_size" not in cfg else cfg
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in cfg:
            raise ConfigError(f"model config: missing field {key!r} (the planner needs a decoder-only "
                              f"config.json with hidden_size, intermediate_size, num_hidden_layers, ...)")
    heads = int(cfg["num_attention_heads"])
    model_type = str(cfg.get("model_type", "llama"))
    act = str(cfg.get("hidden_act", cfg.get("hidden_activation", "silu")))
    gated = model_type not in ("gpt2", "gpt_neox", "phi", "falcon", "opt", "bloom", "starcoder2") and act in _GATED_ACTS
    return Architecture(
        name=str(cfg.get("_qlora_kit_name", model_type)), model_type=model_type, hidden=int(cfg["hidden_size"]),
        intermediate=int(cfg["intermediate_size"]), layers=int(cfg["num_hidden_layers"]), heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads), vocab=int(cfg["vocab_size"]),
        tied=bool(cfg.get("tie_word_embeddings", False)), gated_mlp=gated,
        norms_per_layer=4 if model_type in ("gemma2", "gemma3", "gemma3_text") else 2,
        qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        final_softcap=bool(cfg.get("final_logit_softcapping")), attn_softcap=bool(cfg.get("attn_logit_softcapping")))


def target_names(arch: Architecture, targets: str | list[str]) -> list[str]:
    """Which per-layer linears get LoRA: "all-linear", a list of suffixes, or "attention"/"mlp"."""
    names = list(arch.linears())
    if targets == "all-linear":
        return names
    wanted = targets.split(",") if isinstance(targets, str) else list(targets)
    chosen = [n for n in names if n in wanted]
    if not chosen:
        raise ConfigError(f"targets={targets!r} matches none of this model's linears ({', '.join(names)}); "
                          "use all-linear or a comma-separated list such as q_proj,v_proj")
    return chosen


# ---------------------------------------------------------------------------------------------
# The physics, in bytes

def quantized_bytes(n: int, quant: QuantConfig, dtype_bytes: int) -> float:
    """Bytes of ``n`` weights stored by bitsandbytes: 4-bit codes + absmax scales (8-bit DQ or fp32)."""
    if quant.bits == 16:
        return n * dtype_bytes
    if quant.bits == 8:
        return n * 1.0  # int8 codes; the per-row fp32 scales are added by the caller per matrix
    blocks = -(-n // quant.blocksize)
    if quant.double_quant:  # uint8 absmax, fp32 absmax per 256 of them, a 256-entry fp32 code, an offset
        scales = blocks + -(-blocks // 256) * 4 + 256 * 4 + 4
    else:
        scales = blocks * 4
    return n / 2 + scales + 16 * 4  # + the 16-entry NF4/FP4 code


def saved_per_token(arch: Architecture, lora: list[str], r: int, cb: int, lb: int, seq_len: int,
                    attention: str) -> float:
    """Bytes autograd keeps per token for one decoder layer (no checkpointing).

    r: LoRA rank; cb: compute dtype bytes; lb: LoRA dtype bytes. Walks the block in order:
    RMSNorm: upcasts its input to fp32 and keeps it (4h) plus 1/rms (4). Frozen 4-bit linears keep only their
    packed weight. A LoRA linear keeps its input in the LoRA dtype (its own copy when cb != lb, so q/k/v keep
    three) and the r-wide intermediate. RoPE keeps cos/sin only (shared). SDPA (flash on CPU and GPU, GQA
    without repeating k/v) keeps q, k, v, its output and the fp32 log-sum-exp per head; eager attention keeps
    the fp32 softmax and the probabilities (s per head per token). Gated MLP: act(gate) keeps gate, the product
    keeps act(gate) and up; down's LoRA keeps the product.
    """
    h, i = arch.hidden, arch.intermediate
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim

    def lora_inputs(group: list[str], width: int, already_saved: bool) -> float:
        hit = [n for n in group if n in lora]
        if not hit:
            return 0.0
        if cb == lb:  # the LoRA keeps the very tensor the layers received, once
            return 0.0 if already_saved else cb * width
        return lb * width * len(hit)  # each LoRA casts the input to its own dtype and keeps the copy

    total = arch.norms_per_layer * (4 * h + 4)
    total += lora_inputs(["q_proj", "k_proj", "v_proj"], h, False)
    if attention == "sdpa":
        total += cb * (2 * q + 2 * kv) + 4 * arch.heads
    else:  # eager: q, repeated k and v, fp32 softmax, probabilities (+ tanh output when soft-capped)
        total += cb * 3 * q + arch.heads * seq_len * (4 + cb + (cb if arch.attn_softcap else 0))
    total += lora_inputs(["o_proj"], q, attention == "sdpa")
    total += lora_inputs(["gate_proj", "up_proj"] if arch.gated_mlp else ["up_proj"], h, False)
    total += cb * i * (3 if arch.gated_mlp else 1)  # gate, act(gate), up  |  fc1 output
    total += lora_inputs(["down_proj"], i, False)  # the product (gated) | the activation's output
    total += len(lora) * lb * r  # each LoRA's r-wide intermediate x @ A^T
    return total


def layer_backward_transient(arch: Architecture, cb: int, lb: int) -> float:
    """Bytes per token of gradient buffers alive on top of a layer's saved tensors during its backward.

    The widest point is the MLP: down_proj's backward holds the output gradient (cb·h, and lb·h on the LoRA
    path) and the gradient of its LoRA input copy (lb·I); by the product's backward that copy is freed and
    the two gradients of gate and up (2·cb·I) take its place.
    """
    return max(lb, 2 * cb) * arch.intermediate + (cb + lb) * arch.hidden


def loss_bytes(arch: Architecture, tokens: int, cb: int, chunked: bool, chunk: int, supervised: float) -> float:
    """Peak bytes of the loss over the vocabulary (see the module docstring)."""
    V, h = arch.vocab, arch.hidden
    softcap = cb * V if arch.final_softcap else 0  # tanh output kept for backward
    if not chunked:
        return tokens * max(cb * V + 4 * V + 4 * V + softcap, 12 * V + softcap)
    sup = tokens * supervised  # qlora_kit.training.loss: each chunk is checkpointed, so one chunk's logits live at a time,
    # as in the unchunked case; plus the gathered supervised hidden states and their gradient
    return min(chunk, sup) * (max(cb * V + 8 * V, 12 * V) + softcap) + sup * h * cb * 2


# ---------------------------------------------------------------------------------------------
# The plan


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
    advice: str  # the cheapest change that makes it fit, or why it already fits
    params: int = 0  # model parameters
    lora_params: int = 0  # trainable LoRA parameters

    def __str__(self) -> str:
        return format_plan(self)


def _optimizer_bytes(sizes: list[int], optimizer: str) -> float:
    if optimizer.endswith("8bit"):
        return sum(8 * n if n < 4096 else 2 * n + n / 256 * 8 for n in sizes)
    return 8.0 * sum(sizes)


@dataclass
class _Parts:
    """Every byte count of one plan (per device), before it is arranged into rows."""

    w4: float  # quantized weights
    w4_alt: float  # quantized weights with the other double-quant setting
    unq: float  # unquantized parameters
    lora_params: int  # LoRA parameter count (all devices)
    lora: float  # LoRA weights
    grads: float  # LoRA gradients
    opt: float  # optimizer states
    opt_alt: float  # optimizer states of the 32-bit/8-bit alternative
    ddp_bucket: float  # DDP's persistent gradient buckets
    acts: float  # stored activations under the chosen checkpointing
    acts_alt: float  # stored activations under the other checkpointing setting
    loss: float  # loss peak under the chosen loss
    loss_alt: float  # loss peak under the other loss
    recompute: float  # one layer's saved tensors, recomputed in backward (checkpointing only)
    transient: float  # backward buffers + the dequantized weight + FSDP's gathered layers
    step: float  # the optimizer step's temporary buffers
    layers: int  # decoder layers


def frozen_bytes(arch: Architecture, quant: QuantConfig, dtype_bytes: int) -> tuple[float, float]:
    """(quantized block linears of all layers, unquantized weights: embeddings, head, norms, biases) in bytes."""
    w4 = arch.layers * sum(quantized_bytes(a * b, quant, dtype_bytes) + (4 * b if quant.bits == 8 else 0)
                           for a, b in arch.linears().values())
    bias = arch.layers * (arch.heads + 2 * arch.kv_heads) * arch.head_dim if arch.qkv_bias else 0
    unq = dtype_bytes * (arch.vocab * arch.hidden * (1 if arch.tied else 2)
                         + (arch.norms_per_layer * arch.layers + 1) * arch.hidden + bias)
    return w4, unq


def _weight_parts(arch: Architecture, s: dict, lora_names: list[str], n_dev: int) -> dict:
    cb, quant = _DTYPE_BYTES[s["compute_dtype"]], s["quant"]
    lin = arch.linears()
    dq = dataclasses.replace(quant, double_quant=not quant.double_quant)
    w4, unq = frozen_bytes(arch, quant, cb)
    w4_alt = arch.layers * sum(quantized_bytes(a * b, dq, cb) for a, b in lin.values())
    if s.get("offload", "none") != "none":  # offloaded: the layer running and the next one are resident
        w4, w4_alt = (x * min(2, arch.layers) / arch.layers for x in (w4, w4_alt))
    sizes = [s["rank"] * x for _ in range(arch.layers) for name in lora_names for x in lin[name]]
    P = sum(sizes)
    opt_alt = "adamw" if s["optimizer"].endswith("8bit") else "adamw_8bit"
    return dict(w4=w4 / n_dev, w4_alt=w4_alt / n_dev, unq=unq / n_dev, lora_params=P, lora=4 * P / n_dev,
                grads=4 * P / n_dev, opt=_optimizer_bytes(sizes, s["optimizer"]) / n_dev,
                opt_alt=_optimizer_bytes(sizes, opt_alt) / n_dev,
                ddp_bucket=4.0 * P if s["strategy"] == "ddp" and s["devices"] > 1 else 0.0,
                step=2 * 4 * max(sizes, default=0))


def _activation_parts(arch: Architecture, s: dict, lora_names: list[str], fsdp_gather: float) -> dict:
    cb = _DTYPE_BYTES[s["compute_dtype"]]
    # qlora_kit.model.fused runs 4-bit base + LoRA as one op in the compute dtype: it saves the layer's input once
    # and the r-wide intermediate, both in cb; other bases take the unfused path with fp32 LoRA copies
    lb = cb if s["quant"].bits == 4 else 4
    T = s["batch"] * s["seq_len"]
    per_layer = saved_per_token(arch, lora_names, s["rank"], cb, lb, s["seq_len"], s["attention"])
    shared = 2 * cb * arch.head_dim + 4 * arch.hidden + 8  # cos/sin, final norm's fp32 input
    full = T * (arch.layers * per_layer + shared)
    ckpt = T * (arch.layers * cb * arch.hidden + shared)
    on = s["grad_checkpointing"]
    loss_args = (arch, T, cb), (s["loss_chunk"], s["supervised_fraction"])
    dequant = max(a * b for a, b in arch.linears().values()) * cb
    return dict(acts=ckpt if on else full, acts_alt=full if on else ckpt,
                loss=loss_bytes(*loss_args[0], s["chunked_loss"], *loss_args[1]),
                loss_alt=loss_bytes(*loss_args[0], not s["chunked_loss"], *loss_args[1]),
                recompute=T * per_layer if on else 0.0,
                transient=T * layer_backward_transient(arch, cb, lb) + dequant + fsdp_gather)


def _parts(arch: Architecture, s: dict) -> _Parts:
    lora_names = target_names(arch, s["targets"])
    n_dev = s["devices"] if s["strategy"] == "fsdp" else 1
    w = _weight_parts(arch, s, lora_names, n_dev)
    gather = 2 * (w["w4"] + w["unq"]) / arch.layers if n_dev > 1 else 0.0  # FSDP: this layer and the next
    return _Parts(**w, **_activation_parts(arch, s, lora_names, gather), layers=arch.layers)


def _moments(p: _Parts) -> dict[str, tuple[float, float, float, float]]:
    """Per moment: (activations, gradients, loss, transients) alive besides static memory.

    Layer l's backward holds (l+1)/L of the stored activations and (L-l)/L of the gradients; the extremes
    l = L-1 and l = 0 bound it.
    """
    at_top, at_bottom = (p.acts, p.grads / p.layers), (p.acts / p.layers, p.grads)
    acts, grads = max(at_top, at_bottom, key=sum)
    return {"loss backward": (p.acts, 0.0, p.loss, 0.0),
            "layer backward": (acts, grads, 0.0, p.recompute + p.transient),
            "optimizer step": (0.0, p.grads, 0.0, p.step)}


def _rows(p: _Parts, s: dict, at: tuple[float, float, float, float], overhead: float) -> list[Row]:
    quant, ckpt, chunked = s["quant"], s["grad_checkpointing"], s["chunked_loss"]
    opt_alt = "adamw" if s["optimizer"].endswith("8bit") else "adamw_8bit"
    weights = (f"4-bit weights ({quant.quant_type}{' + double quant' if quant.double_quant else ''})"
               if quant.bits == 4 else f"{quant.bits}-bit weights")
    if s.get("offload", "none") != "none":
        weights += f", {s['offload']}-offloaded: {min(2, p.layers)} of {p.layers} layers resident"
    return [
        Row(weights, p.w4, p.w4, f"{'without' if quant.double_quant else 'with'} double quant: {_gib(p.w4_alt)}"),
        Row("unquantized params (embeddings, head, norms)", p.unq, p.unq, ""),
        Row(f"LoRA params (r={s['rank']}, {p.lora_params / 1e6:.1f}M, fp32)", p.lora, p.lora, ""),
        Row("LoRA gradients (fp32)" + (" + DDP buckets" if p.ddp_bucket else ""), p.grads + p.ddp_bucket,
            at[1] + p.ddp_bucket, "allocated during backward"),
        Row(f"optimizer states ({s['optimizer']})", p.opt, p.opt, f"{opt_alt}: {_gib(p.opt_alt)}"),
        Row(f"activations ({'checkpointed' if ckpt else 'no checkpointing'}, {s['attention']})", p.acts, at[0],
            f"{'without' if ckpt else 'with'} checkpointing: {_gib(p.acts_alt)}"),
        Row(f"loss over the vocabulary ({'chunked' if chunked else 'unchunked'})", p.loss, at[2],
            f"{'unchunked' if chunked else 'chunked'}: {_gib(p.loss_alt)}"),
        Row("transients (recompute, backward buffers, dequant)", p.recompute + p.transient,
            at[3], ""),
        Row(f"framework overhead ({s['device']})", overhead, overhead,
            "torch + transformers + bitsandbytes runtime" if s["device"] == "cpu" else "CUDA context + workspaces"),
    ]


def _plan_rows(arch: Architecture, s: dict) -> tuple[list[Row], str, float, float]:
    """The table rows, the peak moment, the predicted peak and the spillable optimizer bytes."""
    p = _parts(arch, s)
    moments = _moments(p)
    moment = max(moments, key=lambda m: sum(moments[m]))
    overhead = FRAMEWORK_OVERHEAD["cpu" if s["device"] == "cpu" else "cuda"]
    static = p.w4 + p.unq + p.lora + p.opt + p.ddp_bucket + overhead
    spill = p.opt if s["optimizer"].startswith("paged") else 0.0
    return _rows(p, s, moments[moment], overhead), moment, static + sum(moments[moment]), spill


def _gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def parse_bytes(text: str | float | int | None) -> float | None:
    """"24GB", "24GiB", "80 G", "16000MB" -> bytes (GB means GiB: a "24 GB" card has 24 GiB)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B?)\s*", str(text), re.I)
    if not m:
        raise ConfigError(f"device_memory {text!r}: write a size such as 24GB, 80GiB or 16000MB")
    return float(m.group(1)) * 1024 ** "BKMGT".index((m.group(2) or "B").upper())


def _settings(**kw) -> dict:
    s = dict(kw)
    if s["optimizer"] not in _OPTIMIZERS:
        raise ConfigError(f"optimizer {s['optimizer']!r}: use one of {', '.join(_OPTIMIZERS)}")
    if s["compute_dtype"] not in _DTYPE_BYTES:
        raise ConfigError(f"compute_dtype {s['compute_dtype']!r}: use bf16, fp16 or fp32 (the planner needs a "
                          "concrete dtype; 'auto' is bf16 on Ampere+ GPUs)")
    if s["strategy"] not in ("single", "ddp", "fsdp"):
        raise ConfigError(f"strategy {s['strategy']!r}: use single, ddp or fsdp")
    if s.get("offload", "none") not in ("none", "cpu", "disk"):
        raise ConfigError(f"offload {s['offload']!r}: use none, cpu or disk")
    if s["attention"] not in ("sdpa", "eager"):
        raise ConfigError(f"attention {s['attention']!r}: use sdpa or eager")
    for key in ("seq_len", "batch", "rank", "devices"):
        if int(s[key]) < 1:
            raise ConfigError(f"{key} must be a positive integer, got {s[key]!r}")
    s["quant"].validate()
    return s


def _peak(arch: Architecture, s: dict) -> float:
    return _plan_rows(arch, s)[2]


def _fits(arch: Architecture, s: dict, budget: float) -> bool:
    rows, _, total, spill = _plan_rows(arch, s)
    return total - spill <= budget


def _largest(arch: Architecture, s: dict, key: str, budget: float, step: int, limit: int) -> int:
    """The largest multiple of ``step`` (up to ``limit``) for setting ``key`` that fits ``budget``; 0 if none."""
    if not _fits(arch, {**s, key: step}, budget):
        return 0
    lo, hi = 1, max(1, limit // step)
    while lo < hi:  # memory grows with batch and seq_len, so bisect
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _fits(arch, {**s, key: mid * step}, budget) else (lo, mid - 1)
    return lo * step


def _advice(arch: Architecture, s: dict, budget: float) -> str:
    """The cheapest single change (then cumulative changes) that makes the plan fit ``budget``."""
    changes = []
    if not s["grad_checkpointing"]:
        changes.append(("turn gradient checkpointing on (+~33% compute)", {"grad_checkpointing": True}))
    if s["optimizer"] == "adamw" or s["optimizer"] == "paged_adamw_32bit":
        changes.append(("use the 8-bit AdamW (adamw_8bit)", {"optimizer": "adamw_8bit"}))
    if not s["optimizer"].startswith("paged"):
        changes.append(("use paged_adamw_8bit (states spill to host memory)", {"optimizer": "paged_adamw_8bit"}))
    if not s["chunked_loss"]:
        changes.append(("use the chunked loss", {"chunked_loss": True}))
    for r in (8, 4):
        if s["rank"] > r:
            changes.append((f"lower the LoRA rank to {r}", {"rank": r}))
    if s["batch"] > 1:
        changes.append(("use batch 1 with gradient accumulation", {"batch": 1}))
    for label, change in changes:  # one change alone, cheapest first
        if _fits(arch, {**s, **change}, budget):
            return label
    merged: dict = {}
    for label, change in changes:  # then everything at once
        merged.update(change)
    merged_s = {**s, **merged}
    if _fits(arch, merged_s, budget):
        return "combine: " + "; ".join(label for label, _ in changes)
    seq = _largest(arch, merged_s, "seq_len", budget, 64, s["seq_len"])
    if seq:
        return f"combine all of the above and shorten sequences to {seq} tokens"
    floor = _peak(arch, {**merged_s, "seq_len": 64})
    fsdp = "" if s["strategy"] == "fsdp" else "; or shard with --strategy fsdp over several devices"
    return f"does not fit: even at 64 tokens with every saving it needs {_gib(floor)}{fsdp}"


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
        optimizer: "adamw" (32-bit), "adamw_8bit", "paged_adamw_8bit" or "paged_adamw_32bit".
        grad_checkpointing: recompute each decoder layer in backward instead of storing its activations.
        device_memory: memory per device ("24GB", "80GiB" or bytes); enables the verdict.
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
    s = _settings(seq_len=int(seq_len), batch=int(batch), rank=int(rank), targets=targets, optimizer=optimizer,
                  grad_checkpointing=bool(grad_checkpointing), quant=quant or QuantConfig(),
                  compute_dtype=compute_dtype, chunked_loss=bool(chunked_loss), devices=int(devices),
                  strategy=strategy, device=device, attention=attention or ("eager" if arch.attn_softcap else "sdpa"),
                  loss_chunk=int(loss_chunk), supervised_fraction=float(supervised_fraction), offload=offload)
    rows, moment, total, spill = _plan_rows(arch, s)
    budget = parse_bytes(device_memory)
    fits = max_batch = max_seq = None
    advice = ""
    if budget is not None:
        fits = total <= budget
        max_batch = _largest(arch, s, "batch", budget, 1, 4096)
        max_seq = _largest(arch, s, "seq_len", budget, 64, 1 << 20)
        if fits:
            advice = f"fits with {_gib(budget - total)} to spare"
        elif total - spill <= budget:
            advice = f"fits only by paging {_gib(total - budget)} of optimizer state to host memory (slower steps)"
        else:
            advice = _advice(arch, s, budget)
    public = {k: (dataclasses.asdict(v) if k == "quant" else v) for k, v in s.items()}
    return MemoryPlan(arch.name, public, rows, moment, total, rows[-1].bytes, spill, budget, fits, max_batch, max_seq,
                      advice, arch.params, _parts(arch, s).lora_params)


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a text table followed by the verdict."""
    s = plan.settings
    head = (f"{plan.model} ({plan.params / 1e9:.2f}B params): seq_len {s['seq_len']}, batch {s['batch']}, "
            f"rank {s['rank']} ({s['targets']}), {s['optimizer']}, checkpointing "
            f"{'on' if s['grad_checkpointing'] else 'off'}, {s['compute_dtype']} compute, "
            f"{s['devices']} device(s) {s['strategy']}")
    lines = [head, f"{'item':<62}{'size':>11}{'at peak':>11}  note", "-" * 100]
    for r in plan.rows:
        lines.append(f"{r.item:<62}{_gib(r.bytes):>11}{_gib(r.at_peak):>11}  {r.alternative}")
    lines.append("-" * 100)
    lines.append(f"{'peak per device (at the ' + plan.peak_moment + ')':<62}{'':>11}{_gib(plan.total):>11}")
    if plan.spillable:
        lines.append(f"paged optimizer: {_gib(plan.spillable)} of it can move to host memory, "
                     f"so the hard floor is {_gib(plan.total - plan.spillable)}")
    if plan.device_memory is not None:
        verdict = "FITS" if plan.fits else "DOES NOT FIT"
        lines.append(f"verdict: {verdict} in {_gib(plan.device_memory)}: {plan.advice}")
        lines.append(f"largest batch at seq_len {s['seq_len']}: {plan.max_batch}; "
                     f"largest seq_len at batch {s['batch']}: {plan.max_seq_len}")
    return "\n".join(lines)
