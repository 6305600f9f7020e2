"""Configuration dataclasses, YAML loading and ``key=value`` overrides.

Every field has a default and a comment; the comment doubles as the field's help text.
Unknown keys are errors that name the closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid. The message says where and how to fix it."""


@dataclass
class QuantConfig:
    """How the frozen base model is quantized."""

    bits: int = 4  # 4 (NF4/FP4 through bitsandbytes), 8 (LLM.int8) or 16 (no quantization, plain LoRA)
    quant_type: str = "nf4"  # 4-bit code: "nf4" (normal float, QLoRA) or "fp4"
    double_quant: bool = True  # quantize the per-block absmax scales again to 8 bit (saves ~0.37 bit/param)
    blocksize: int = 64  # weights per absmax scale; bitsandbytes quantizes in blocks of 64
    quant_storage: str = "uint8"  # storage dtype of packed 4-bit weights; set to the compute dtype for FSDP

    def validate(self, where: str = "quant") -> None:
        """Raise ConfigError for an impossible setting."""
        if self.bits not in (4, 8, 16):
            raise ConfigError(f"{where}.bits: {self.bits} is not supported; use 4, 8 or 16")
        if self.quant_type not in ("nf4", "fp4"):
            raise ConfigError(f"{where}.quant_type: {self.quant_type!r} is unknown; use 'nf4' or 'fp4'")
        if self.blocksize != 64:
            raise ConfigError(f"{where}.blocksize: transformers quantizes with block size 64 only; got {self.blocksize}")
        if self.quant_storage not in ("uint8", "bfloat16", "float16", "float32"):
            raise ConfigError(f"{where}.quant_storage: {self.quant_storage!r}; use uint8, bfloat16, float16 or float32")


@dataclass
class LoraConfig:
    """Which layers get LoRA adapters, and how the adapters are shaped and initialised."""

    r: int = 16  # adapter rank (the maximum rank when dynamic_rank is on)
    alpha: float = 32.0  # scale numerator: the update is (alpha / r) * B @ A (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0  # dropout on the adapter's input during training
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    init: str = "kaiming"  # A's init: "kaiming" (Kaiming-uniform, as in loralib and PEFT) or "gaussian" (N(0, 1/r)); B is zero
    target_modules: Union[str, list[str]] = "all-linear"  # "all-linear", a list of module-name suffixes, or a regex matched against full names
    layers: Union[list[int], None] = None  # decoder layer indices to adapt; None adapts every layer
    modules_to_save: list[str] = field(default_factory=list)  # modules trained in full as a copy, e.g. ["lm_head", "embed_tokens"] after adding tokens
    dynamic_rank: bool = False  # dynamic-rank training (QDyLoRA): sample a rank per step in [r_min, r]
    r_min: int = 1  # smallest sampled rank when dynamic_rank is on
    # "log_uniform" draws log(rank) uniformly: as many steps in [1, 4) as in [8, 32), so the small ranks one would
    # deploy are trained alone more often (the first rows of A / columns of B are trained at every step either way)
    rank_sampling: str = "uniform"  # per-step rank distribution in [r_min, r]: "uniform" (DyLoRA, QDyLoRA) or "log_uniform"
    active_rank: int = 0  # rank used for evaluation, inference and loading a dynamic adapter; 0 means r

    def validate(self, where: str = "lora") -> None:
        """Raise ConfigError for an impossible setting."""
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"{where}.r: rank must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"{where}.dropout: must be in [0, 1), got {self.dropout!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"{where}.alpha: must be a finite positive number, got {self.alpha!r}")
        if self.init not in ("kaiming", "gaussian"):
            raise ConfigError(f"{where}.init: {self.init!r} is unknown; use 'kaiming' or 'gaussian'")
        if self.dynamic_rank and not 1 <= self.r_min <= self.r:
            raise ConfigError(f"{where}.r_min: must be in [1, r={self.r}], got {self.r_min}")
        if self.rank_sampling not in ("uniform", "log_uniform"):
            raise ConfigError(f"{where}.rank_sampling: {self.rank_sampling!r} is unknown; use 'uniform' or 'log_uniform'")
        if not 0 <= self.active_rank <= self.r:
            raise ConfigError(f"{where}.active_rank: must be in [1, r={self.r}] (or 0 for r), got {self.active_rank}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError(f"{where}.target_modules: empty list; use 'all-linear' or name modules such as q_proj")

    @property
    def scaling(self) -> float:
        """The multiplier of B @ A at the full rank."""
        return self.alpha / (self.r ** 0.5 if self.use_rslora else self.r)


# ---------------------------------------------------------------------------------------------
# Generic dict <-> dataclass conversion with helpful errors.

def _closest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(options)}"


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check and convert one YAML value to the field's annotated type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of settings, got {type(value).__name__}")
        return from_dict(hint, value, where)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{where}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (ValueError, OverflowError):
            raise ConfigError(f"{where}: expected a number, got {value!r:.60}") from None
    if hint is str:
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            return "on" if value else "off"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}{_closest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(where or cls.__name__)
    return obj


def to_dict(obj: Any) -> dict:
    """A plain dict (JSON/YAML-safe) of a dataclass config."""
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value in YAML syntax) into a key path and a value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. lora.r=8")
    key, raw = text.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({getattr(e, 'problem', e)}); "
                          "quote it, e.g. key='value'") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each ``a.b=value`` override into the nested dict ``data`` (in place) and return it."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
        node[path[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with errors that name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, lora, data, training)")
    return data


@dataclass
class ModelConfig:
    """Which checkpoint to fine-tune and how to run it."""

    path: str = ""  # local Hugging Face checkpoint folder (config.json + safetensors + tokenizer); "demo" = SmolLM2-135M-Instruct
    compute_dtype: str = "auto"  # "auto" (by hardware), "bf16", "fp16" or "fp32"
    device: str = ""  # "cpu", "cuda", "cuda:1"; empty picks the first GPU, else the CPU
    trust_remote_code: bool = False  # run the checkpoint's own Python code (off unless you trust it)
    offload: str = "none"  # frozen 4-bit base: "none"; "disk" (memory-mapped from <output_dir>/.offload, paged in by the OS); "cpu" (host, one layer on the device at a time)

    def validate(self, where: str = "model") -> None:
        if self.compute_dtype not in ("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32"):
            raise ConfigError(f"{where}.compute_dtype: {self.compute_dtype!r}; use auto, bf16, fp16 or fp32")
        if self.offload not in ("none", "cpu", "disk"):
            raise ConfigError(f"{where}.offload: {self.offload!r}; use none, cpu or disk")


@dataclass
class DataConfig:
    """Where the training data is, what format it has, and how it is cut into batches."""

    train_file: str = ""  # JSONL, JSON, CSV or Parquet file of training records
    eval_file: str = ""  # validation records; empty holds out eval_fraction of train_file instead
    eval_fraction: float = 0.0  # fraction of train_file held out for validation when eval_file is empty
    format: str = "auto"  # "alpaca", "chat", "prompt_completion", "text", or "auto" (from the first record's fields)
    max_seq_len: int = 512  # longer examples are truncated (and dropped if no supervised token is left)
    train_on_prompt: bool = False  # also train on prompt/system/user tokens (default: responses only)
    packing: bool = False  # pack several examples into one sequence (no attention across them)
    group_by_length: bool = True  # batch examples of similar length together to save padding
    cache_dir: str = ""  # where tokenized data is cached; empty: <output_dir>/../.token-cache
    system_prompt: str = ""  # optional system message added to alpaca and prompt/completion records

    def validate(self, where: str = "data") -> None:
        if self.format not in ("auto", "alpaca", "chat", "prompt_completion", "text"):
            raise ConfigError(f"{where}.format: {self.format!r}; use auto, alpaca, chat, prompt_completion or text")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"{where}.eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        if self.max_seq_len < 8:
            raise ConfigError(f"{where}.max_seq_len: {self.max_seq_len} is too short; use at least 8")


@dataclass
class TrainingConfig:
    """The optimisation loop: batches, optimizer, schedule, evaluation, checkpoints and outputs."""

    output_dir: str = "runs/qlora"  # adapter, checkpoints, metrics.jsonl, loss.png and the run summary go here
    epochs: float = 1.0  # passes over the training data (fractions allowed); max_steps > 0 overrides
    max_steps: int = 0  # optimizer steps to run; 0 derives them from epochs
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (the loss is normalised by supervised tokens across all of them)
    lr: float = 2e-4  # peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay on adapter parameters
    optimizer: str = "paged_adamw_8bit"  # paged_adamw_8bit, paged_adamw_32bit, adamw_8bit or adamw (torch)
    scheduler: str = "cosine"  # cosine, linear or constant, after warmup
    warmup_steps: int = 0  # linear warmup from 0 to lr over these steps
    warmup_ratio: float = 0.0  # warmup as a fraction of all steps (used when warmup_steps is 0)
    max_grad_norm: float = 1.0  # clip the adapter gradients' global norm; 0 disables clipping
    gradient_checkpointing: str = "auto"  # "on", "off", or "auto" (on when the memory plan needs it)
    eval_every: int = 0  # validation loss every N steps; 0 evaluates only at the end
    early_stopping_patience: int = 0  # stop after N evaluations without a better validation loss; 0 never stops early
    save_every: int = 0  # checkpoint every N steps; 0 checkpoints only at the end
    keep_checkpoints: int = 2  # how many recent checkpoints to keep
    on_nonfinite: str = "stop"  # a NaN/inf, diverged or dead step (health.py): "stop", "skip" the step, or "rollback" to the last good checkpoint
    seed: int = 42  # seeds LoRA init, data order, dropout and dynamic-rank sampling
    log_every: int = 1  # write a metrics.jsonl line every N steps
    loss_chunk_size: int = 1024  # supervised positions per chunk of the vocabulary projection in the loss
    distributed: str = "ddp"  # with several processes (accelerate launch / torchrun): "ddp" (replicate the 4-bit base) or "fsdp" (shard it; FSDP-QLoRA)

    def validate(self, where: str = "training") -> None:
        if self.optimizer not in ("paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw"):
            raise ConfigError(f"{where}.optimizer: {self.optimizer!r} is unknown; use paged_adamw_8bit, "
                              "paged_adamw_32bit, adamw_8bit or adamw")
        if self.scheduler not in ("cosine", "linear", "constant"):
            raise ConfigError(f"{where}.scheduler: {self.scheduler!r}; use cosine, linear or constant")
        if self.gradient_checkpointing not in ("on", "off", "auto"):
            raise ConfigError(f"{where}.gradient_checkpointing: {self.gradient_checkpointing!r}; use on, off or auto")
        if self.on_nonfinite not in ("stop", "skip", "rollback"):
            raise ConfigError(f"{where}.on_nonfinite: {self.on_nonfinite!r}; use stop, skip or rollback")
        if self.distributed not in ("ddp", "fsdp"):
            raise ConfigError(f"{where}.distributed: {self.distributed!r}; use ddp or fsdp")
        for name in ("batch_size", "grad_accum", "keep_checkpoints", "log_every", "loss_chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "epochs", "weight_decay", "warmup_ratio", "max_grad_norm"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{where}.{name}: must be a finite number, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr: must be a finite positive number, got {self.lr}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError(f"{where}: set epochs > 0 or max_steps > 0")


@dataclass
class TrainConfig:
    """A whole fine-tune: the YAML file's sections."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the checkpoint and how to run it
    quant: QuantConfig = field(default_factory=QuantConfig)  # how the base is quantized
    lora: LoraConfig = field(default_factory=LoraConfig)  # the adapters
    data: DataConfig = field(default_factory=DataConfig)  # the data and batching
    training: TrainingConfig = field(default_factory=TrainingConfig)  # the optimisation loop

    def validate(self, where: str = "") -> None:
        self.quant.validate("quant")
        self.lora.validate("lora")
        if not self.model.path:
            raise ConfigError("model.path: required (a local checkpoint folder, or 'demo')")
        if not self.data.train_file:
            raise ConfigError("data.train_file: required (a JSONL, JSON, CSV or Parquet file)")


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (optional), apply ``key=value`` overrides, and validate it."""
    data = load_yaml(path) if path else {}
    try:
        apply_overrides(data, overrides or [])
        return from_dict(TrainConfig, data)
    except ConfigError as e:
        overridden = {o.split("=", 1)[0].strip() for o in overrides or []}
        line = _key_line(Path(path), str(e), overridden) if path else None
        raise ConfigError(f"{path}{f' line {line}' if line else ''}: {e}" if path else str(e)) from None


_ERROR_KEY = re.compile(r"^(?:unknown config key ')?([A-Za-z_]\w*(?:\.\w+)*)")


def _key_line(path: Path, message: str, overridden: set[str]) -> int | None:
    """The 1-based line of the YAML key an error message starts with (``lora.r: ...``), if the file has it
    and no ``key=value`` override replaced it."""
    match = _ERROR_KEY.match(message)
    if match and match.group(1) in overridden:
        return None
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return None
    line = None
    for part in match.group(1).split(".") if match else []:
        if not isinstance(node, yaml.MappingNode):
            break
        hit = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part), None)
        if hit is None:
            break
        line, node = hit[0].start_mark.line + 1, hit[1]
    return line
