"""Check an adapter folder before anything is allocated: ``adapter_config.json`` against the weights' header.

``check_adapter`` reads the JSON and the safetensors header (tensor names, dtypes and shapes; no tensor data)
and raises ConfigError naming the file, the field and the fix. Every reader of adapters (load_adapter, merge,
adapter-resize, generate, rank-sweep, resume) goes through ``adapters.read_adapter``, which calls it first, so
a wrong ``r`` (say 1,000,000 on a rank-4 file) is an error before a single LoRA matrix is allocated.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from qlora_kit.config import ConfigError, LoraConfig, QuantConfig, from_dict

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_PARTS = (".lora_A.weight", ".lora_B.weight")


@dataclass
class AdapterSpec:
    """An adapter folder, checked without reading any tensor data."""

    config: LoraConfig  # the LoRA settings (adapter_config.json, dynamic-rank settings from the header)
    lora: dict[str, tuple[str, str]]  # module name -> (lora_A key, lora_B key) in the weight file
    copies: dict[str, dict[str, str]]  # modules_to_save module -> parameter name -> key in the weight file
    quant: QuantConfig | None  # the quantization it was trained against, when qlora-kit saved it
    meta: dict  # qlora-kit's metadata from the safetensors header ({} for PEFT's adapters)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _read_config(cfg_file: Path) -> dict:
    """The parsed adapter_config.json; it must be a JSON object."""
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_file} line {e.lineno}: invalid JSON: {e.msg}") from None
    except (ValueError, RecursionError) as e:  # undecodable bytes, a 5000-digit integer, nesting too deep
        raise ConfigError(f"{cfg_file}: unreadable JSON ({str(e)[:80]}); re-save the adapter") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_file}: expected a JSON object of LoRA settings, got a {type(raw).__name__}; "
                          'write it as {"peft_type": "LORA", "r": 16, "lora_alpha": 32, ...}')
    return raw


def _get(raw: dict, key: str, kinds: tuple, what: str, where: Path, default: Any = ..., check=None) -> Any:
    """``raw[key]`` if it is one of ``kinds`` (bool is never a number) and passes ``check``; else ConfigError."""
    if raw.get(key) is None:
        if default is ...:
            raise ConfigError(f'{where}: missing field "{key}" ({what}); add it with the value the adapter was '
                              "trained with")
        return default
    value = raw[key]
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok or (check is not None and not check(value)):
        raise ConfigError(f'{where}: field "{key}" must be {what}, got {_show(value)}; fix it to the value the '
                          "adapter was trained with")
    return value


def _list_of(kind: type):
    return lambda v: isinstance(v, list) and all(isinstance(x, kind) and not isinstance(x, bool) for x in v)


def _lora_settings(raw: dict, cfg_file: Path) -> dict:
    """The LoRA fields of adapter_config.json, type- and range-checked."""
    if _get(raw, "peft_type", (str,), 'the string "LORA"', cfg_file, "LORA") != "LORA":
        raise ConfigError(f"{cfg_file}: peft_type {raw['peft_type']!r}; only LORA adapters are supported")
    for unsupported in ("rank_pattern", "alpha_pattern"):
        if _get(raw, unsupported, (dict,), "an object", cfg_file, {}):
            raise ConfigError(f"{cfg_file}: {unsupported} (per-layer ranks) is not supported by qlora-kit; "
                              "re-save the adapter with one r and lora_alpha")
    if _get(raw, "use_dora", (bool,), "true or false", cfg_file, False):
        raise ConfigError(f"{cfg_file}: DoRA adapters are not supported by qlora-kit")
    if _get(raw, "bias", (str,), 'a string such as "none"', cfg_file, "none") != "none":
        raise ConfigError(f'{cfg_file}: bias={raw["bias"]!r} is not supported (qlora-kit trains no biases); '
                          'use adapters saved with "bias": "none"')
    targets = _get(raw, "target_modules", (str, list), "a module name, a regex or a list of names", cfg_file,
                   None, lambda v: isinstance(v, str) or _list_of(str)(v))
    layers = _get(raw, "layers_to_transform", (int, list), "a layer index or a list of them", cfg_file, None,
                  lambda v: all(x >= 0 for x in ([v] if isinstance(v, int) else v)) and
                  (isinstance(v, int) or _list_of(int)(v)))
    return dict(
        r=_get(raw, "r", (int,), "a positive integer (the adapter's rank)", cfg_file, check=lambda v: v >= 1),
        alpha=float(_get(raw, "lora_alpha", (int, float), "a finite positive number", cfg_file,
                         check=lambda v: math.isfinite(v) and v > 0)),
        dropout=float(_get(raw, "lora_dropout", (int, float), "a number in [0, 1)", cfg_file, 0.0,
                           lambda v: 0 <= v < 1)),
        use_rslora=_get(raw, "use_rslora", (bool,), "true or false", cfg_file, False),
        target_modules=targets or "all-linear", layers=[layers] if isinstance(layers, int) else layers,
        modules_to_save=_get(raw, "modules_to_save", (list,), "a list of module names", cfg_file, [], _list_of(str)))


def _header(weights: Path) -> tuple[dict, dict[str, tuple[str, list[int]]]]:
    """(qlora-kit metadata, key -> (dtype, shape)) from the safetensors header; no tensor data is read."""
    try:
        with safe_open(str(weights), "pt") as f:
            tensors = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}
            text = (f.metadata() or {}).get("qlora_kit", "{}")
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{weights}: not a readable safetensors file ({str(e)[:80]}); re-save the adapter") from None
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise ConfigError(f"{weights}: the header's qlora_kit metadata is not a JSON object; re-save the adapter")
    if not tensors:
        raise ConfigError(f"{weights}: holds no tensors; an adapter holds lora_A/lora_B weights")
    return meta, tensors


def _saved_settings(meta: dict, r: int, weights: Path) -> tuple[dict, QuantConfig | None]:
    """qlora-kit's dynamic-rank settings and quantization from the header, checked."""
    where = Path(f"{weights} (qlora_kit metadata)")
    saved = _get(meta, "lora", (dict,), "an object", where, {})
    settings = dict(dynamic_rank=_get(saved, "dynamic_rank", (bool,), "true or false", where, False),
                    r_min=min(_get(saved, "r_min", (int,), "an integer >= 1", where, 1, lambda v: v >= 1), r),
                    rank_sampling=_get(saved, "rank_sampling", (str,), "a string", where, "uniform"),
                    active_rank=min(_get(saved, "active_rank", (int,), "an integer >= 0", where, 0,
                                         lambda v: v >= 0), r))
    quant = _get(meta, "quant", (dict,), "an object", where, None)
    try:
        return settings, from_dict(QuantConfig, quant, "quant") if quant else None
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _group(tensors: dict[str, tuple[str, list[int]]], modules_to_save: list[str], weights: Path
           ) -> tuple[dict[str, list], dict[str, dict[str, str]]]:
    """Sort the header's keys into LoRA pairs and modules_to_save copies; anything else is an error."""
    lora: dict[str, list] = {}
    copies: dict[str, dict[str, str]] = {}
    for key in tensors:
        k = key.removeprefix(PREFIX)
        part = next((p for p in _PARTS if k.endswith(p)), None)
        if part is not None:
            lora.setdefault(k[: -len(part)], [None, None])[_PARTS.index(part)] = key
            continue
        if not any(k.startswith(m + ".") or f".{m}." in f".{k}" for m in modules_to_save):
            raise ConfigError(f"{weights}: unexpected tensor {key!r} (not LoRA A/B, not a modules_to_save copy)")
        module, _, pname = k.rpartition(".")
        copies.setdefault(module, {})[pname] = key
    for module, (a, b) in lora.items():
        if a is None or b is None:
            raise ConfigError(f"{weights}: module {module!r} has only one of lora_A / lora_B")
    return lora, copies


def _check_shapes(lora: dict[str, list], tensors: dict, r: int, cfg_file: Path, weights: Path) -> None:
    """Every lora_A is ``[r, in]`` and every lora_B ``[out, r]``, floating point, with ``r`` of the config."""
    for module, (a, b) in sorted(lora.items()):
        (a_dtype, a_shape), (b_dtype, b_shape) = tensors[a], tensors[b]
        if len(a_shape) != 2 or len(b_shape) != 2 or 0 in a_shape or 0 in b_shape or a_shape[0] != b_shape[1]:
            raise ConfigError(f"{weights}: module {module!r} has lora_A {a_shape} and lora_B {b_shape}; they must "
                              "be [r, in] and [out, r] with the same r (the file is damaged; re-save the adapter)")
        if a_dtype not in _FLOAT_DTYPES or b_dtype not in _FLOAT_DTYPES:
            raise ConfigError(f"{weights}: module {module!r} has lora_A/lora_B of dtype {a_dtype}/{b_dtype}; "
                              "LoRA weights are floating point (the file is damaged; re-save the adapter)")
        if a_shape[0] != r:
            raise ConfigError(f'{cfg_file}: field "r" is {r} but the tensors have rank {a_shape[0]} ({a} is '
                              f'{a_shape}); set "r": {a_shape[0]}, or use the adapter_config.json saved with '
                              "these weights")


def check_adapter(path: str | Path) -> AdapterSpec:
    """Check an adapter folder (ours or PEFT's) from its JSON and its safetensors header alone.

    Args:
        path: the folder holding ``adapter_config.json`` and ``adapter_model.safetensors``.
    Returns:
        An AdapterSpec: the LoRA settings and where each tensor sits in the weight file.
    Raises:
        ConfigError naming the file, the field and the fix: a missing file, malformed JSON, a field of the
        wrong type or out of range, an unsupported feature, or an ``r`` that does not match the tensors.
    """
    path = Path(path)
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_file, weights):
        if not f.is_file():
            hint = " (qlora-kit never loads pickled adapter_model.bin)" if f == weights else ""
            raise ConfigError(f"{f}: missing; an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}{hint}")
    settings = _lora_settings(_read_config(cfg_file), cfg_file)
    meta, tensors = _header(weights)
    lora, copies = _group(tensors, settings["modules_to_save"], weights)
    _check_shapes(lora, tensors, settings["r"], cfg_file, weights)
    saved, quant = _saved_settings(meta, settings["r"], weights)
    config = LoraConfig(**settings, **saved)
    config.validate(f"{weights} (qlora_kit metadata): lora")
    return AdapterSpec(config, {m: (a, b) for m, (a, b) in lora.items()}, copies, quant, meta)
