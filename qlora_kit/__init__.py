"""qlora-kit: quantized, low-memory LoRA fine-tuning of LLMs on one GPU or a CPU.

The whole workflow in one namespace: configs, ``load_model`` + ``add_lora``, ``train``, ``generate``,
adapters on disk, ``merge_and_export`` and ``plan_memory``.
"""

from qlora_kit.api import load_train_config, train
from qlora_kit.config import (
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    QuantConfig,
    TrainConfig,
    TrainingConfig,
)
from qlora_kit.inference.evaluate import EvalResult, evaluate
from qlora_kit.inference.generate import generate
from qlora_kit.merging.gguf_export import export_gguf
from qlora_kit.merging.pipeline import merge_and_export
from qlora_kit.model.adapters import load_adapter, save_adapter
from qlora_kit.model.load import load_model
from qlora_kit.model.lora import (
    active_adapters,
    adapters_disabled,
    add_lora,
    parameter_report,
    set_active_adapters,
    set_rank,
)
from qlora_kit.planning.memory import plan_memory
from qlora_kit.training.run import TrainResult

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "EvalResult",
    "DataConfig",
    "LoraConfig",
    "ModelConfig",
    "QuantConfig",
    "TrainConfig",
    "TrainResult",
    "TrainingConfig",
    "active_adapters",
    "adapters_disabled",
    "add_lora",
    "evaluate",
    "export_gguf",
    "generate",
    "load_adapter",
    "load_model",
    "load_train_config",
    "merge_and_export",
    "parameter_report",
    "plan_memory",
    "save_adapter",
    "set_active_adapters",
    "set_rank",
    "train",
]
