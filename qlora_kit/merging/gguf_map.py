"""A Hugging Face causal LM in GGUF terms: architecture, metadata, tensor names, layouts and types.

Names and keys come from the ``gguf`` package (the reader/writer maintained with llama.cpp): its per-architecture
tensor name maps (``gguf.get_tensor_name_map``) and its ``GGUFWriter.add_*`` metadata setters. What is ours is the
choice of which config field feeds which key, the tensor types per requested quantization, and llama's Q/K row
order (see ``permute_qk``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from qlora_kit.config import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch


class GgufError(ConfigError):
    """The model or the request cannot be exported to GGUF; nothing was written."""


@dataclasses.dataclass(frozen=True)
class GgufArch:
    """How one Hugging Face ``model_type`` is written in GGUF."""

    name: str  # GGUF architecture name (general.architecture), e.g. "llama"
    permute_qk: bool  # llama.cpp's llama graph expects Q/K rows reordered for its rope (see permute_qk)
    norm_shift: float = 0.0  # added to every *norm.weight: Gemma's RMSNorm scales by (1 + w), llama.cpp by w
    swa_period: int = 0  # Gemma: llama.cpp's fixed sliding-window layer pattern (layer i slides iff i % p < p - 1)
    big_layers: int = 0  # Gemma: the layer count at which llama.cpp scales queries by hidden/heads, not head_dim


# HF model_type -> GGUF architecture. Mistral is written as llama, as llama.cpp's converter does. Gemma 2/3 use
# NeoX-style rope (no Q/K reordering), store norms as 1 + w, and llama.cpp fixes their sliding-window pattern and
# query scale by architecture (gemma_checks refuses configs it would run differently).
ARCHITECTURES = {"llama": GgufArch("llama", True), "mistral": GgufArch("llama", True),
                 "qwen2": GgufArch("qwen2", False), "gemma2": GgufArch("gemma2", False, 1.0, 2, 46),
                 "gemma3_text": GgufArch("gemma3", False, 1.0, 6, 62)}
# Types written here with gguf's numpy code (bit-exact with ggml's reference quantizer for Q8_0).
NUMPY_TYPES = ("f32", "f16", "bf16", "q8_0")
# Types that need llama.cpp's quantizer (llama-cpp-python): name -> llama_ftype value.
LLAMA_CPP_TYPES = {"q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13,
                   "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}
QUANT_TYPES = NUMPY_TYPES + tuple(LLAMA_CPP_TYPES)
# Checkpoint tensors that GGUF does not store (recomputed by the runtime).
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def gguf_arch(config: dict, where: str) -> GgufArch:
    """The GGUF architecture for a config.json; raises GgufError (before any work) for unsupported ones."""
    model_type = config.get("model_type")
    if model_type == "gemma3":
        raise GgufError(f"{where}: model_type 'gemma3' is the multimodal Gemma 3; export its text model "
                        "(Gemma3ForCausalLM, model_type 'gemma3_text') or convert with llama.cpp's convert_hf_to_gguf.py")
    if model_type not in ARCHITECTURES:
        raise GgufError(f"{where}: model_type {model_type!r} cannot be exported to GGUF yet "
                        f"(supported: {', '.join(sorted(ARCHITECTURES))}); export safetensors with `qlora-kit merge` "
                        "and convert with llama.cpp's convert_hf_to_gguf.py")
    scaling = rope_settings(config)[1]
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in ("default", "linear"):
        raise GgufError(f"{where}: rope scaling {rope_type!r} is not supported by this exporter yet (only none or "
                        "linear); convert the merged folder with llama.cpp's convert_hf_to_gguf.py")
    arch = ARCHITECTURES[model_type]
    if arch.swa_period:
        gemma_checks(config, arch, where)
    return arch


def rope_settings(config: dict) -> tuple[float, dict, float | None]:
    """(rope theta of the full-attention layers, their rope scaling dict, theta of the sliding layers or None).

    Reads transformers 5's ``rope_parameters`` (flat, or per layer type as Gemma 3 has it) and the older
    ``rope_theta`` / ``rope_scaling`` / ``rope_local_base_freq`` fields."""
    params = config.get("rope_parameters") or {}
    full = params.get("full_attention", params)
    local = params.get("sliding_attention") or {}
    theta = float(_cfg(full, "rope_theta", default=_cfg(config, "rope_theta", default=10000.0)))
    scaling = config.get("rope_scaling") or full
    local_theta = _cfg(local, "rope_theta", default=config.get("rope_local_base_freq"))
    return theta, scaling, None if local_theta is None else float(local_theta)


def _gemma_layer_types(config: dict, arch: GgufArch) -> tuple[list, list]:
    """(the config's layer types, the ones llama.cpp will run: sliding iff i % period < period - 1)."""
    n, p = int(config["num_hidden_layers"]), arch.swa_period
    runtime = ["sliding_attention" if i % p < p - 1 else "full_attention" for i in range(n)]
    pattern = config.get("sliding_window_pattern") or config.get("_sliding_window_pattern")
    given = config.get("layer_types") or (["sliding_attention" if (i + 1) % int(pattern) else "full_attention"
                                           for i in range(n)] if pattern else runtime)
    return list(given), runtime


def gemma_checks(config: dict, arch: GgufArch, where: str) -> None:
    """Refuse a Gemma config that llama.cpp would run differently: it fixes the sliding-window layer pattern, the
    sliding layers' rope theta (10000), the query scale (1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B
    layer count), the tanh GELU; Gemma 2 always soft-caps, Gemma 3 never does there."""
    act = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    problems = [] if act in ("gelu_pytorch_tanh", "gelu_tanh") else [f"hidden activation {act!r} (llama.cpp: tanh GELU)"]
    given, runtime = _gemma_layer_types(config, arch)
    if given != runtime:
        problems.append(f"layer_types {given} (llama.cpp runs {runtime})")
    n_layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    runtime_scalar = config["hidden_size"] // heads if n_layers == arch.big_layers else head_dim(config)
    scalar = config.get("query_pre_attn_scalar", 256)
    if scalar != runtime_scalar:
        problems.append(f"query_pre_attn_scalar {scalar} (llama.cpp scales queries by 1/sqrt({runtime_scalar}))")
    local = rope_settings(config)[2]
    if arch.name == "gemma3" and local not in (None, 10000.0):
        problems.append(f"sliding layers' rope theta {local:g} (llama.cpp: 10000)")
    caps = [config.get("attn_logit_softcapping"), config.get("final_logit_softcapping")]
    if arch.name == "gemma3" and any(caps):
        problems.append("logit soft-capping (llama.cpp's gemma3 graph has none)")
    if arch.name == "gemma2" and not all(caps):
        problems.append("no attention/final logit soft-capping (llama.cpp's gemma2 graph always applies both)")
    if problems:
        raise GgufError(f"{where}: llama.cpp's {arch.name} runtime would not reproduce this model: "
                        f"{'; '.join(problems)}. Export safetensors with `qlora-kit merge` instead")


def check_quant(quant: str) -> str:
    """The normalized quantization name; raises GgufError naming the choices."""
    q = quant.lower()
    if q not in QUANT_TYPES:
        raise GgufError(f"--quant {quant!r}: use one of {', '.join(QUANT_TYPES)}")
    return q


def _cfg(config: dict, *names, default=None):
    for n in names:
        if config.get(n) is not None:
            return config[n]
    return default


def head_dim(config: dict) -> int:
    """Per-head dimension: config.head_dim, else hidden_size / num_attention_heads."""
    return int(_cfg(config, "head_dim", default=config["hidden_size"] // config["num_attention_heads"]))


def _add_gemma_metadata(writer, config: dict, arch: GgufArch) -> None:
    """Gemma's sliding window and (Gemma 2) attention / final logit soft-capping, as llama.cpp reads them."""
    if config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))
    if arch.name == "gemma2":
        writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))  # both set (gemma_checks)
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))


def add_arch_metadata(writer, config: dict, n_vocab: int, arch: GgufArch) -> None:
    """The architecture keys a runtime needs: sizes, heads, rope, norm epsilon, vocabulary size, Gemma's extras."""
    import gguf

    heads, kv_heads = int(config["num_attention_heads"]), int(_cfg(config, "num_key_value_heads",
                                                                     default=config["num_attention_heads"]))
    writer.add_context_length(int(_cfg(config, "max_position_embeddings", default=2048)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(float(_cfg(config, "rms_norm_eps", default=1e-6)))
    theta, scaling, _ = rope_settings(config)
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config["hidden_size"] // heads or arch.swa_period:  # Gemma readers default to 256
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    if arch.swa_period:
        _add_gemma_metadata(writer, config, arch)
    if (scaling.get("rope_type") or scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_vocab_size(n_vocab)


@dataclasses.dataclass
class TensorOut:
    """One GGUF tensor: where it comes from in the checkpoint and how it is stored."""

    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    key: str  # checkpoint key, e.g. "model.layers.0.self_attn.q_proj.weight"
    shape: tuple[int, ...]  # PyTorch order ([out, in] for a linear)
    ggml_type: object  # gguf.GGMLQuantizationType
    permute_heads: int = 0  # > 0: reorder rows for llama's rope with this many heads
    shift: float = 0.0  # added to the values before storing (Gemma norms: 1 + w)

    @property
    def nbytes(self) -> int:
        from gguf import GGML_QUANT_SIZES

        block, size = GGML_QUANT_SIZES[self.ggml_type]
        return math.prod(self.shape) // block * size


def tensor_type(shape: tuple[int, ...], quant: str):
    """The stored type: F32 for vectors; else the requested numpy type (Q8_0 needs rows divisible by 32, else F16).

    For llama.cpp types the streamed file is F16 and llama.cpp re-quantizes it afterwards."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    if len(shape) < 2 or quant == "f32":
        return T.F32
    chosen = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}.get(quant, T.F16)
    return chosen if shape[-1] % GGML_QUANT_SIZES[chosen][0] == 0 else T.F16


def map_tensors(keys_shapes: list[tuple[str, tuple[int, ...]]], config: dict, arch: GgufArch, quant: str,
                where: str) -> list[TensorOut]:
    """GGUF name, type and layout for every checkpoint tensor, in order. Raises GgufError for a tensor with no
    GGUF name in this architecture (before anything is written)."""
    import gguf

    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch.name)
    names = gguf.get_tensor_name_map(model_arch, int(config["num_hidden_layers"]))
    allowed = set(gguf.MODEL_TENSORS[model_arch])
    heads = int(config["num_attention_heads"])
    kv_heads = int(_cfg(config, "num_key_value_heads", default=heads))
    out, unknown = [], []
    for key, shape in keys_shapes:
        if key.endswith(_SKIPPED_SUFFIXES):
            continue
        found = names.get_type_and_name(key, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in allowed:
            unknown.append(key)
            continue
        kind, name = found
        permute = 0
        if arch.permute_qk and kind in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
            permute = heads if kind == gguf.MODEL_TENSOR.ATTN_Q else kv_heads
        shift = arch.norm_shift if key.endswith("norm.weight") else 0.0
        out.append(TensorOut(name, key, tuple(shape), tensor_type(tuple(shape), quant), permute, shift))
    if unknown:
        raise GgufError(f"{where}: {len(unknown)} tensor(s) have no GGUF name for architecture {arch.name!r}: "
                        f"{', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''} (a modified architecture? "
                        "export safetensors with `qlora-kit merge` instead)")
    return out


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder Q/K rows from Hugging Face's rope layout (halves) to llama.cpp's (interleaved pairs).

    HF rotates dimension i with i + d/2 within each head; llama.cpp's llama graph rotates 2i with 2i+1. Rows of
    each head go from [first half | second half] to [h0, s0, h1, s1, ...]. Works on weights ``[out, in]`` and
    biases ``[out]``; transformers' GGUF loader applies the inverse.
    """
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *rest).transpose(1, 2).reshape(w.shape)


def encode(t: torch.Tensor, ggml_type, where: str) -> np.ndarray:
    """A fp32 tensor in the stored type, as numpy (F32/F16 typed; BF16/Q8_0 as packed bytes from gguf.quants)."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    a = t.contiguous().numpy()
    if ggml_type == T.F32:
        return a
    if ggml_type == T.F16:
        h = a.astype(np.float16)
        if not np.isfinite(h).all():
            raise GgufError(f"{where}: values beyond float16's range (max |w| = {np.abs(a).max():.3g}); "
                            "export with --quant bf16 or f32")
        return h
    return quants.quantize(a, ggml_type)
