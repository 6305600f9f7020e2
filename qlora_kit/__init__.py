"""qlora-kit: quantized, low-memory LoRA fine-tuning of LLMs on one GPU or a CPU."""
from qlora_kit.model.adapters import load_adapter, save_adapter
from qlora_kit.config import ConfigError, LoraConfig, QuantConfig
from qlora_kit.model.lora import (active_adapters, adapters_disabled, add_lora, parameter_report, set_active_adapters,
                   set_rank)
from qlora_kit.inference.evaluate import EvalResult, evaluate
from qlora_kit.inference.generate import generate
from qlora_kit.merging.merge import merge_and_export
from qlora_kit.planning.memory import plan_memory
from qlora_kit.model.load import load_model

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "EvalResult", "LoraConfig", "QuantConfig", "active_adapters", "adapters_disabled", "add_lora",
    "evaluate", "generate",
    "load_adapter", "load_model", "merge_and_export", "parameter_report", "plan_memory", "save_adapter", "set_active_adapters", "set_rank",
]
