"""The planner's physics: the bytes of each item of a QLoRA fine-tune on one device, and the peak moment.

Every figure is derived from the block's tensors:

* 4-bit weights: n/2 bytes of codes plus one absmax per 64 weights (fp32, or 8-bit with double quantization
  plus one fp32 scale per 256 absmax); unquantized parameters (embeddings, an untied head, norms, biases)
  in the compute dtype, as ``load_model`` loads them.
* LoRA: r·(in+out) per adapted linear, kept in fp32 by ``add_lora``; gradients the same; optimizer states as
  ``qlora_kit.optimizers`` counts them (AdamW: two fp32 moments, 8 bytes/param; AdamW8bit: two uint8 moments
  plus one fp32 absmax per 256, tensors under 4096 elements staying 32-bit, as in bitsandbytes). Paged states
  are counted on the device, and the verdict says how much of them can spill to host memory.
* Activations: the tensors autograd saves for one Llama/Mistral/Qwen2/Gemma-style decoder layer, derived in
  ``saved_per_token`` below; with checkpointing only each layer's input is kept and one layer is recomputed.
* The loss: unchunked (``model(..., labels=...)``) the head's logits in the compute dtype, the fp32 upcast and
  fp32 log-probabilities exist in forward, and in backward the saved log-probs, their gradient and the
  logits' gradient (3 x 4 bytes per token per vocabulary entry); chunked (and fused: the gradient computed in
  forward), one chunk of fp32 logits and a compute-dtype copy of their gradient, plus the supervised tokens'
  hidden states and their gradient.
* The peak is the static memory (weights, LoRA parameters, optimizer states, framework) plus the largest of
  three moments: the loss backward (every saved activation alive, no LoRA gradient yet), a decoder layer's
  backward (activations partly freed, gradients partly allocated), and the optimizer step (all gradients).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qlora_kit.config import ConfigError, QuantConfig
from qlora_kit.dtypes import dtype_bytes, dtype_name
from qlora_kit.optimizers import OPTIMIZER_NAMES, optimizer_spec
from qlora_kit.planning.models import Architecture, target_names

GiB = 2**30
# Framework overhead (bytes, per device). CUDA: the context with lazily loaded kernels (~0.3-0.5 GB), cuBLAS
# workspaces and the caching allocator's slack, together about 1 GiB in nvidia-smi for a training process.
# CPU: RssAnon of a process after importing torch, transformers, bitsandbytes and the model's code and running
# a first matmul (measured here: 273 MB after the imports, about 300 MB initialised).
FRAMEWORK_OVERHEAD = {"cuda": 1 * GiB, "cpu": 300 * 2**20}


def gib(x: float) -> str:
    """Bytes as "12.34 GiB"."""
    return f"{x / GiB:.2f} GiB"


@dataclass(frozen=True)
class PlanSettings:
    """Every setting a plan assumes (see ``plan_memory`` for their meaning)."""

    seq_len: int  # tokens per sequence
    batch: int  # sequences per micro-step
    rank: int  # LoRA rank
    targets: str | list[str]  # "all-linear" or per-layer linear names
    optimizer: str  # a name of qlora_kit.optimizers.OPTIMIZERS
    grad_checkpointing: bool  # recompute each decoder layer in backward
    quant: QuantConfig  # how the base is quantized
    compute_dtype: str  # "fp32", "bf16" or "fp16"
    chunked_loss: bool  # qlora-kit's chunked loss rather than full-vocabulary logits
    devices: int  # devices the run spans
    strategy: str  # "single", "ddp" or "fsdp"
    device: str  # "cuda" or "cpu": which framework overhead to add
    attention: str  # "sdpa" or "eager"
    loss_chunk: int  # supervised positions per chunk of the chunked loss
    supervised_fraction: float  # share of tokens that carry labels
    offload: str  # "none", "cpu" or "disk": the frozen base offloaded, two layers resident

    def validate(self) -> PlanSettings:
        """Return these settings with the compute dtype's short name; ConfigError names a bad setting."""
        if self.optimizer not in OPTIMIZER_NAMES:
            raise ConfigError(f"optimizer {self.optimizer!r}: use one of {', '.join(OPTIMIZER_NAMES)}")
        try:
            short = dtype_name(self.compute_dtype)
        except ValueError:
            raise ConfigError(f"compute_dtype {self.compute_dtype!r}: use bf16, fp16 or fp32 (the planner needs a "
                              "concrete dtype; 'auto' is bf16 on Ampere+ GPUs)") from None
        for key, allowed in (("strategy", ("single", "ddp", "fsdp")), ("offload", ("none", "cpu", "disk")),
                             ("attention", ("sdpa", "eager"))):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} {getattr(self, key)!r}: use {', '.join(allowed[:-1])} or {allowed[-1]}")
        for key in ("seq_len", "batch", "rank", "devices"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        self.quant.validate()
        return dataclasses.replace(self, compute_dtype=short)

    @property
    def cb(self) -> int:
        """Bytes per element of the compute dtype."""
        return dtype_bytes(self.compute_dtype)


# ---------------------------------------------------------------------------------------------
# Bytes per item

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


def frozen_bytes(arch: Architecture, quant: QuantConfig, dtype_bytes: int) -> tuple[float, float]:
    """(quantized block linears of all layers, unquantized weights: embeddings, head, norms, biases) in bytes."""
    w4 = arch.layers * sum(quantized_bytes(a * b, quant, dtype_bytes) + (4 * b if quant.bits == 8 else 0)
                           for a, b in arch.linears().values())
    bias = arch.layers * (arch.heads + 2 * arch.kv_heads) * arch.head_dim if arch.qkv_bias else 0
    unq = dtype_bytes * (arch.vocab * arch.hidden * (1 if arch.tied else 2)
                         + (arch.norms_per_layer * arch.layers + 1) * arch.hidden + bias)
    return w4, unq


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
    sup = tokens * supervised  # qlora_kit.training.loss, fused path (a frozen head): one chunk at a time holds its
    # fp32 logits, turned in place into their gradient, and that gradient's copy in the compute dtype (plus the fp32
    # tanh and capped logits under softcapping); afterwards only the supervised hidden states and their gradient
    softcap = 8 * V if arch.final_softcap else 0
    return min(chunk, sup) * ((cb + 4) * V + softcap) + sup * h * cb * 2


def optimizer_bytes(sizes: list[int], optimizer: str) -> float:
    """Optimizer state bytes for parameter tensors of ``sizes`` elements (``qlora_kit.optimizers``)."""
    spec = optimizer_spec(optimizer)
    return sum(spec.state_bytes(n) for n in sizes)


def alternative_optimizer(optimizer: str) -> str:
    """The optimizer of the other state precision, for the table's note: 8-bit -> adamw, 32-bit -> adamw_8bit."""
    return "adamw" if optimizer_spec(optimizer).state_bits == 8 else "adamw_8bit"


# ---------------------------------------------------------------------------------------------
# Items and the peak

@dataclass
class Parts:
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


@dataclass
class Peak:
    """When the peak happens and what it adds up to."""

    moment: str  # "loss backward", "layer backward" or "optimizer step"
    alive: tuple[float, float, float, float]  # (activations, gradients, loss, transients) alive at that moment
    total: float  # bytes: static memory + ``alive`` (framework overhead included)
    overhead: float  # bytes: the framework overhead inside ``total``
    spill: float  # bytes of paged optimizer state that can move to host memory


def _weight_parts(arch: Architecture, s: PlanSettings, lora_names: list[str], n_dev: int) -> dict:
    cb, quant, lin = s.cb, s.quant, arch.linears()
    w4, unq = frozen_bytes(arch, quant, cb)
    dq = dataclasses.replace(quant, double_quant=not quant.double_quant)
    w4_alt = arch.layers * sum(quantized_bytes(a * b, dq, cb) for a, b in lin.values())
    if s.offload != "none":  # offloaded: the layer running and the next one are resident
        w4, w4_alt = (x * min(2, arch.layers) / arch.layers for x in (w4, w4_alt))
    sizes = [s.rank * x for _ in range(arch.layers) for name in lora_names for x in lin[name]]
    P = sum(sizes)
    return dict(w4=w4 / n_dev, w4_alt=w4_alt / n_dev, unq=unq / n_dev, lora_params=P, lora=4 * P / n_dev,
                grads=4 * P / n_dev, opt=optimizer_bytes(sizes, s.optimizer) / n_dev,
                opt_alt=optimizer_bytes(sizes, alternative_optimizer(s.optimizer)) / n_dev,
                ddp_bucket=4.0 * P if s.strategy == "ddp" and s.devices > 1 else 0.0,
                step=2 * 4 * max(sizes, default=0))


def _activation_parts(arch: Architecture, s: PlanSettings, lora_names: list[str], fsdp_gather: float) -> dict:
    cb = s.cb
    # qlora_kit.model.fused runs 4-bit base + LoRA as one op in the compute dtype: it saves the layer's input once
    # and the r-wide intermediate, both in cb; other bases take the unfused path with fp32 LoRA copies
    lb = cb if s.quant.bits == 4 else 4
    T = s.batch * s.seq_len  # tokens per micro-step
    per_layer = saved_per_token(arch, lora_names, s.rank, cb, lb, s.seq_len, s.attention)
    shared = 2 * cb * arch.head_dim + 4 * arch.hidden + 8  # cos/sin, final norm's fp32 input
    full = T * (arch.layers * per_layer + shared)
    ckpt = T * (arch.layers * cb * arch.hidden + shared)
    on = s.grad_checkpointing
    loss_args = (arch, T, cb), (s.loss_chunk, s.supervised_fraction)
    dequant = max(a * b for a, b in arch.linears().values()) * cb
    return dict(acts=ckpt if on else full, acts_alt=full if on else ckpt,
                loss=loss_bytes(*loss_args[0], s.chunked_loss, *loss_args[1]),
                loss_alt=loss_bytes(*loss_args[0], not s.chunked_loss, *loss_args[1]),
                recompute=T * per_layer if on else 0.0,
                transient=T * layer_backward_transient(arch, cb, lb) + dequant + fsdp_gather)


def parts(arch: Architecture, s: PlanSettings) -> Parts:
    """Every item's bytes per device under settings ``s``."""
    lora_names = target_names(arch, s.targets)
    n_dev = s.devices if s.strategy == "fsdp" else 1
    w = _weight_parts(arch, s, lora_names, n_dev)
    gather = 2 * (w["w4"] + w["unq"]) / arch.layers if n_dev > 1 else 0.0  # FSDP: this layer and the next
    return Parts(**w, **_activation_parts(arch, s, lora_names, gather), layers=arch.layers)


def moments(p: Parts) -> dict[str, tuple[float, float, float, float]]:
    """Per moment: (activations, gradients, loss, transients) alive besides static memory.

    Layer l's backward holds (l+1)/L of the stored activations and (L-l)/L of the gradients; the extremes
    l = L-1 and l = 0 bound it.
    """
    at_top, at_bottom = (p.acts, p.grads / p.layers), (p.acts / p.layers, p.grads)
    acts, grads = max(at_top, at_bottom, key=sum)
    return {"loss backward": (p.acts, 0.0, p.loss, 0.0),
            "layer backward": (acts, grads, 0.0, p.recompute + p.transient),
            "optimizer step": (0.0, p.grads, 0.0, p.step)}


def peak(arch: Architecture, s: PlanSettings) -> tuple[Parts, Peak]:
    """The items and the peak moment of settings ``s`` on one device."""
    p = parts(arch, s)
    alive = moments(p)
    moment = max(alive, key=lambda m: sum(alive[m]))
    overhead = FRAMEWORK_OVERHEAD["cpu" if s.device == "cpu" else "cuda"]
    static = p.w4 + p.unq + p.lora + p.opt + p.ddp_bucket + overhead
    spill = p.opt if optimizer_spec(s.optimizer).paged else 0.0
    return p, Peak(moment, alive[moment], static + sum(alive[moment]), overhead, spill)
