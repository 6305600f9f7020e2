"""The model shapes the planner works from: a config.json (a dict, a path, a checkpoint folder or a shipped name
such as "llama-3.1-70b") read into an ``Architecture``, and the LoRA target names it resolves."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.config import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"  # shipped config.json files, one per model name
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
    """Names of the model configs shipped in qlora_kit/planning/configs (e.g. "llama-3.1-70b")."""
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
