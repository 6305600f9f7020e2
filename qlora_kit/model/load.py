"""Load a Hugging Face causal LM with a frozen 4-bit (or 8-bit) base, ready for LoRA training."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from qlora_kit.config import ConfigError, QuantConfig
from qlora_kit.dtypes import parse_dtype
from qlora_kit.hardware import choose_compute_dtype, default_device
from qlora_kit.model.attention import use_short_attention
from qlora_kit.model.quant import is_4bit, is_8bit, logical_numel
from qlora_kit.model.remote_code import check_remote_code

log = logging.getLogger("qlora_kit")


def _drop_kernels_hint(record: logging.LogRecord) -> bool:
    """Drop bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community ... pip install kernels".

    bitsandbytes logs it at WARNING on every import on CPUs with AVX512-BF16 when the optional ``kernels``
    package (which downloads kernels from a model hub) is absent; it then uses its own kernel, so nothing failed.
    """
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


# bitsandbytes is imported lazily, always after this module (qlora_kit/__init__ imports it), so the filter is in
# place before the record is emitted.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_kernels_hint)


def check_model_path(path: str | Path, trust_remote_code: bool = False) -> dict:
    """Validate that ``path`` is a local causal-LM checkpoint folder and return its config.json.

    Raises ConfigError naming the path and the fix, also when its model or tokenizer needs custom code
    (``auto_map``) and ``trust_remote_code`` is off; nothing is loaded.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not path.is_dir():
        raise ConfigError(f"model.path {str(path)!r}: no such folder (give a local Hugging Face checkpoint folder; "
                          "run `qlora-kit demo --prepare` for the demo model)")
    if not config_file.is_file():
        raise ConfigError(f"model.path {str(path)!r}: no config.json there, so it is not a Hugging Face checkpoint")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{config_file} line {e.lineno}: invalid JSON: {e.msg}") from None
    check_remote_code(path, trust_remote_code)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not any(a.endswith("ForCausalLM") for a in archs):
        raise ConfigError(f"{config_file}: model_type {model_type!r} ({', '.join(archs) or 'no architectures'}) "
                          "is not a causal language model; qlora-kit fine-tunes *ForCausalLM checkpoints")
    weights = list(path.glob("*.safetensors"))
    if not weights:
        raise ConfigError(f"model.path {str(path)!r}: no *.safetensors weights (qlora-kit never loads pickled "
                          "*.bin weights; convert them with safetensors first)")
    return config


def bnb_config(quant: QuantConfig, compute_dtype: torch.dtype):
    """The transformers ``BitsAndBytesConfig`` for ``quant``, every setting explicit (bnb defaults to fp4)."""
    from transformers import BitsAndBytesConfig

    if quant.bits == 16:
        return None
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=parse_dtype(quant.quant_storage) if quant.quant_storage != "uint8" else torch.uint8,
    )


def load_model(path: str | Path, quant: QuantConfig | None = None, compute_dtype: str = "auto",
               gradient_checkpointing: bool = False, device: str | None = None,
               trust_remote_code: bool = False, offload: str = "none", offload_folder: str | Path | None = None):
    """Load a causal LM with its linear layers in 4-bit (NF4 + double quant by default), frozen.

    Args:
        path: local folder with config.json, safetensors weights and a tokenizer.
        quant: quantization settings; defaults to NF4, double quantization, block size 64.
        compute_dtype: "auto" (by hardware, see ``hardware.choose_compute_dtype``), "bf16", "fp16" or "fp32".
        gradient_checkpointing: recompute each decoder layer in backward instead of keeping its activations.
        device: "cpu", "cuda", "cuda:1"...; default: the first GPU if any, else the CPU.
        trust_remote_code: run the checkpoint's own Python code (off unless you trust its author).
        offload, offload_folder: keep the frozen 4-bit base off the heap ("disk": memory-mapped from a file in
            ``offload_folder``) or off the device ("cpu"); see ``offload.offload_base``.
    Returns:
        ``(model, tokenizer)``; the model is frozen (no parameter requires grad) until ``add_lora``.
    Raises:
        ConfigError for a bad path or setting, before any weight is read.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quant = quant or QuantConfig()
    quant.validate()
    check_model_path(path, trust_remote_code)
    dev = torch.device(device) if device else default_device()
    dtype = choose_compute_dtype(compute_dtype, dev)
    if trust_remote_code:
        log.warning("trust_remote_code=True: the checkpoint's own Python code will run")
    start = time.perf_counter()
    if offload == "disk":  # quantize straight into the memory-mapped file: the model is never whole in memory
        model = _load_disk_offloaded(Path(path), quant, dtype, dev, offload_folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, quantization_config=bnb_config(quant, dtype), device_map={"": str(dev)},
            trust_remote_code=trust_remote_code, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prepare_for_kbit_training(model, dtype, gradient_checkpointing)
    if dev.type == "cpu":
        use_short_attention(model)  # faster training attention at short lengths, same memory as SDPA
    if offload == "cpu":
        from qlora_kit.offload.runtime import offload_base

        offload_base(model, offload)
    model.qlora_quant = quant  # recorded in saved adapters so a merge can re-quantize identically
    model.qlora_compute_dtype = dtype
    log.info("loaded %s in %s on %s in %.1f s (%.0f MB)", path, _quant_name(quant), dev,
             time.perf_counter() - start, model_bytes(model) / 2**20)
    return model, tokenizer


def _load_disk_offloaded(path: Path, quant: QuantConfig, dtype: torch.dtype, dev: torch.device,
                         folder: str | Path | None) -> nn.Module:
    """``offload="disk"``: stream-quantize ``path`` into ``folder`` (reused if current) and map the model onto it."""
    from transformers import GenerationConfig

    from qlora_kit.offload.build import build_from_folder, quantize_to_folder
    from qlora_kit.offload.runtime import stream_layers

    if folder is None:
        raise ConfigError("model.offload=disk needs a folder for the weight file (offload_folder)")
    quantize_to_folder(path, folder, quant, dtype)
    model = build_from_folder(folder, dtype)
    model.name_or_path = model.config._name_or_path = str(path)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    if dev.type != "cpu":  # small weights to the device; the 4-bit layers stay mapped and are copied per layer
        for _, module in model.named_modules():
            for name, p in module.named_parameters(recurse=False):
                if getattr(p, "quant_state", None) is None:
                    setattr(module, name, nn.Parameter(p.data.to(dev), requires_grad=False))
            for name, b in module.named_buffers(recurse=False):
                module.register_buffer(name, b.to(dev))
        model.tie_weights()
        stream_layers(model, dev)
    log.info("model.offload=disk: the frozen weights are memory-mapped from %s", Path(folder) / "weights.bin")
    return model


def _quant_name(quant: QuantConfig) -> str:
    if quant.bits == 4:
        return f"4-bit {quant.quant_type}{' + double quant' if quant.double_quant else ''}"
    return {8: "8-bit LLM.int8", 16: "16-bit (no quantization)"}[quant.bits]


def prepare_for_kbit_training(model: nn.Module, compute_dtype: torch.dtype, gradient_checkpointing: bool) -> None:
    """Freeze the base, keep norms in fp32 under fp16 compute, and set up gradient checkpointing.

    Unlike PEFT's helper this does not upcast every unquantized weight to fp32: under bf16/fp32 compute
    that only costs memory.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        # bitsandbytes repacks a 4-bit weight for a bf16 CPU kernel on its first no-grad eval forward, with
        # bf16 scales and no autograd through it. Keep one numeric path for train, eval, merge and export.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    if compute_dtype == torch.float16:
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                module.float()
    model.config.use_cache = False
    set_gradient_checkpointing(model, gradient_checkpointing)


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn per-decoder-layer activation checkpointing on or off (non-reentrant, so no input-grad hack).

    Calls transformers' ``activation_checkpointing_*`` names where they exist (transformers 5 deprecates the
    ``gradient_checkpointing_*`` ones with a FutureWarning), else the older names.
    """
    new_names = hasattr(model, "activation_checkpointing_enable")
    if enabled:
        kwargs = {"use_reentrant": False}
        if new_names:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif new_names and getattr(model, "is_activation_checkpointing", False):
        model.activation_checkpointing_disable()
    elif not new_names and getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()


def model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (packed 4-bit weights plus their quant states)."""
    total, seen = 0, set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:
            total += _quant_state_bytes(state)
    return total


def _quant_state_bytes(state) -> int:
    n = state.absmax.numel() * state.absmax.element_size() + state.code.numel() * state.code.element_size()
    if getattr(state, "nested", False) and state.state2 is not None:
        s2 = state.state2
        n += s2.absmax.numel() * s2.absmax.element_size() + s2.code.numel() * s2.code.element_size() + 4
    return n


def footprint(model: nn.Module) -> dict:
    """Bytes of the loaded model, of its 4-bit layers, and of the same parameters in bf16."""
    quantized_params, quantized_bytes = 0, 0
    for module in model.modules():
        if is_4bit(module) or is_8bit(module):
            w = module.weight
            quantized_params += logical_numel(w)
            quantized_bytes += w.numel() * w.element_size() + (_quant_state_bytes(w.quant_state) if is_4bit(module) else 0)
    seen, params = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += logical_numel(p)
    return {"bytes": model_bytes(model), "bf16_bytes": 2 * params, "params": params,
            "quantized_params": quantized_params, "quantized_bytes": quantized_bytes,
            "bytes_per_quantized_param": quantized_bytes / max(quantized_params, 1)}
