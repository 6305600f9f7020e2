"""qlora-kit: quantized, low-memory LoRA fine-tuning of LLMs on one GPU or a CPU."""
from .adapters import load_adapter, save_adapter
from .config import ConfigError, LoraConfig, QuantConfig
from .gguf_export import export_gguf
from .lora import (active_adapters, adapters_disabled, add_lora, parameter_report, set_active_adapters,
                   set_rank)
from .merge import merge_and_export
from .memory import plan_memory
from .model import load_model

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "LoraConfig", "QuantConfig", "active_adapters", "adapters_disabled", "add_lora", "export_gguf",
    "load_adapter", "load_model", "merge_and_export", "parameter_report", "plan_memory", "save_adapter", "set_active_adapters", "set_rank",
]
