"""Configuration dataclasses, YAML loading and ``key=value`` overrides.

Every field has a default and a comment; the comment doubles as the field's help text.
Unknown keys are errors that name the closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
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

    def validate(self, where: str = "lora") -> None:
        """Raise ConfigError for an impossible setting."""
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"{where}.r: rank must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"{where}.dropout: must be in [0, 1), got {self.dropout!r}")
        if float(self.alpha) <= 0:
            raise ConfigError(f"{where}.alpha: must be positive, got {self.alpha!r}")
        if self.init not in ("kaiming", "gaussian"):
            raise ConfigError(f"{where}.init: {self.init!r} is unknown; use 'kaiming' or 'gaussian'")
        if self.dynamic_rank and not 1 <= self.r_min <= self.r:
            raise ConfigError(f"{where}.r_min: must be in [1, r={self.r}], got {self.r_min}")
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
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
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
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


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
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, lora, data, training)")
    return data
