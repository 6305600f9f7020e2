"""The names other fine-tuning tools give our settings, for the "did you mean" of an unknown config key.

Keys are names from transformers' TrainingArguments, PEFT's LoraConfig, TRL's SFTConfig and Axolotl's YAML
(lower case); values are our full dotted key, with a suggested value after ": " where the meaning moved
(``bf16: true`` is ``model.compute_dtype: bf16`` here). Axolotl configs are flat, so these names are looked
up wherever they appear.
"""
from __future__ import annotations

import difflib

ALIASES: dict[str, str] = {
    # optimisation (TrainingArguments, TRL, Axolotl)
    "learning_rate": "training.lr", "num_train_epochs": "training.epochs", "num_epochs": "training.epochs",
    "per_device_train_batch_size": "training.batch_size", "micro_batch_size": "training.batch_size",
    "train_batch_size": "training.batch_size", "gradient_accumulation_steps": "training.grad_accum",
    "lr_scheduler_type": "training.scheduler", "lr_scheduler": "training.scheduler", "optim": "training.optimizer",
    "save_steps": "training.save_every", "save_strategy": "training.save_every",
    "eval_steps": "training.eval_every", "evaluation_strategy": "training.eval_every",
    "eval_strategy": "training.eval_every", "logging_steps": "training.log_every",
    "save_total_limit": "training.keep_checkpoints", "fsdp": "training.distributed: fsdp",
    # LoRA (PEFT, Axolotl)
    "rank": "lora.r", "lora_r": "lora.r", "lora_rank": "lora.r", "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout", "lora_target_modules": "lora.target_modules",
    "lora_target_linear": "lora.target_modules: all-linear", "layers_to_transform": "lora.layers",
    "lora_modules_to_save": "lora.modules_to_save", "init_lora_weights": "lora.init",
    # data and sequence length
    "sequence_len": "data.max_seq_len", "max_seq_length": "data.max_seq_len", "max_length": "data.max_seq_len",
    "seq_len": "data.max_seq_len", "cutoff_len": "data.max_seq_len", "model_max_length": "data.max_seq_len",
    "val_set_size": "data.eval_fraction", "test_size": "data.eval_fraction", "datasets": "data.train_file",
    "dataset": "data.train_file", "data_path": "data.train_file", "dataset_path": "data.train_file",
    "train_on_inputs": "data.train_on_prompt", "sample_packing": "data.packing",
    # model and precision
    "base_model": "model.path", "model_name_or_path": "model.path", "pretrained_model_name_or_path": "model.path",
    "model_name": "model.path", "model_id": "model.path", "bf16": "model.compute_dtype: bf16",
    "fp16": "model.compute_dtype: fp16", "torch_dtype": "model.compute_dtype",
    "bnb_4bit_compute_dtype": "model.compute_dtype", "device_map": "model.device",
    # quantization (BitsAndBytesConfig)
    "load_in_4bit": "quant.bits: 4", "load_in_8bit": "quant.bits: 8", "bnb_4bit_quant_type": "quant.quant_type",
    "bnb_4bit_use_double_quant": "quant.double_quant", "bnb_4bit_quant_storage": "quant.quant_storage",
}


def suggest(path: str, own: list[str], tree: dict[str, list[str]]) -> str:
    """The hint for the unknown dotted key ``path``.

    ``own`` are the valid keys beside it; ``tree`` maps each section to its keys (``""`` to the sections).
    In order: the same name in another section, a name another tool uses, the closest key beside it;
    else the list of valid keys.
    """
    name = path.rsplit(".", 1)[-1].lower().replace("-", "_")
    for section, keys in tree.items():
        if section and name in keys and f"{section}.{name}" != path:
            return f"did you mean '{section}.{name}'?"
    if name in ALIASES:
        return f"did you mean '{ALIASES[name]}'?"
    match = difflib.get_close_matches(name, own, n=1, cutoff=0.5)
    return f"did you mean {match[0]!r}?" if match else f"valid keys: {', '.join(own)}"
