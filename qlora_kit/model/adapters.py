"""Adapters on disk in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's: ``base_model.model.<module>.lora_A.weight`` ``[r, in]``, ``...lora_B.weight`` ``[out, r]``,
and ``base_model.model.<module>.weight`` for a ``modules_to_save`` copy. qlora-kit's own facts (the
quantization the adapter was trained against, its dynamic-rank settings) ride in the safetensors header,
which PEFT ignores.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from qlora_kit.atomic import atomic_dir, safetensors_bytes
from qlora_kit.config import ConfigError, LoraConfig, QuantConfig
from qlora_kit.model.adapter_check import CONFIG_FILE, PREFIX, WEIGHTS_FILE, check_adapter
from qlora_kit.model.lora import (
    LoraLinear,
    TrainableCopy,
    active_adapters,
    attach_adapter,
    inference_rank,
    layer_index,
    lora_layers,
    resolve_targets,
    set_active_adapters,
    set_rank,
)


class AdapterMismatchError(ValueError):
    """The adapter was trained on a base whose module names or shapes differ from this model's."""


def _compact_targets(model: nn.Module, names: list[str]) -> tuple[list[str], list[int] | None]:
    """PEFT's (target_modules, layers_to_transform) for exactly ``names``: leaf names when they suffice."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    layers = sorted({i for n in names if (i := layer_index(n)) is not None})
    for candidate_layers in (None, layers):
        try:
            chosen = resolve_targets(model, LoraConfig(target_modules=leaves, layers=candidate_layers))
        except ConfigError:
            continue
        if sorted(chosen) == sorted(names):
            return leaves, candidate_layers
    return sorted(names), None


def adapter_state(model: nn.Module, name: str = "default", rank: int | None = None) -> dict[str, torch.Tensor]:
    """PEFT-keyed tensors of adapter ``name``, truncated to ``rank`` (dynamic-rank export) if given."""
    state = {}
    for module_name, layer in lora_layers(model):
        if name in layer.adapters:
            a = layer.adapters[name]
            k = min(rank or a.r, a.r)
            state[f"{PREFIX}{module_name}.lora_A.weight"] = a.lora_A[:k].detach().contiguous().cpu()  # [k, in]
            state[f"{PREFIX}{module_name}.lora_B.weight"] = a.lora_B[:, :k].detach().contiguous().cpu()  # [out, k]
    for module_name, module in model.named_modules():
        if isinstance(module, TrainableCopy) and name in module.copies:
            for pname, p in module.copies[name].named_parameters():
                state[f"{PREFIX}{module_name}.{pname}"] = p.detach().contiguous().cpu()
    return state


def write_adapter_files(folder: Path, model: nn.Module, name: str = "default", rank: int | None = None,
                        base_model_name_or_path: str | None = None) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` of adapter ``name`` into ``folder``."""
    configs = getattr(model, "lora_configs", {})
    if name not in configs:
        raise KeyError(f"no adapter named {name!r} on this model; it has {sorted(configs)}")
    config = configs[name]
    modules = [n for n, layer in lora_layers(model) if name in layer.adapters]
    r = min(rank or config.r, config.r)
    targets, layers = _compact_targets(model, modules)
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": config.alpha,
        "lora_dropout": config.dropout, "use_rslora": config.use_rslora, "target_modules": targets,
        "layers_to_transform": layers, "modules_to_save": list(config.modules_to_save) or None,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_dora": False,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None),
    }
    quant = getattr(model, "qlora_quant", None)
    meta = {"lora": dataclasses.asdict(config), "exported_rank": r,
            "quant": dataclasses.asdict(quant) if quant is not None else None,
            "compute_dtype": str(getattr(model, "qlora_compute_dtype", "")).removeprefix("torch.")}
    data = safetensors_bytes(adapter_state(model, name, rank), {"format": "pt", "qlora_kit": json.dumps(meta)})
    (folder / WEIGHTS_FILE).write_bytes(data)
    (folder / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")


def save_adapter(model: nn.Module, out_dir: str | Path, name: str = "default", rank: int | None = None,
                 base_model_name_or_path: str | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write adapter ``name`` to ``out_dir`` in PEFT's format, atomically (temp folder, then rename).

    ``rank`` exports a dynamic-rank adapter truncated to its first ``rank`` components, as an ordinary
    rank-``rank`` LoRA. ``extra_files`` maps file names to text written beside the adapter. Returns the folder.
    An existing ``out_dir`` is replaced only if it is an adapter folder (holds adapter_config.json) or empty;
    anything else raises FileExistsError.
    """
    with atomic_dir(out_dir, ours=(CONFIG_FILE,), kind="adapter") as tmp:
        write_adapter_files(tmp, model, name, rank, base_model_name_or_path)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
    return Path(out_dir)


@dataclasses.dataclass
class AdapterFile:
    """An adapter folder read from disk: its LoRA settings, tensors keyed by module, and our metadata."""

    config: LoraConfig
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A [r, in], B [out, r])
    copies: dict[str, dict[str, torch.Tensor]]  # modules_to_save module -> its parameters
    quant: QuantConfig | None  # the quantization it was trained against, when qlora-kit saved it
    meta: dict


def read_adapter(path: str | Path) -> AdapterFile:
    """Read an adapter folder (ours or PEFT's), checked by ``check_adapter`` before any tensor is read.

    Raises ConfigError naming the file, the field and the fix.
    """
    spec = check_adapter(path)
    with safe_open(str(Path(path) / WEIGHTS_FILE), "pt") as f:
        lora = {module: (f.get_tensor(a), f.get_tensor(b)) for module, (a, b) in spec.lora.items()}
        copies = {module: {p: f.get_tensor(k) for p, k in params.items()} for module, params in spec.copies.items()}
    return AdapterFile(spec.config, lora, copies, spec.quant, spec.meta)


def check_matches(model: nn.Module, adapter: AdapterFile, path: Path) -> None:
    """Raise AdapterMismatchError when a module is missing or an A/B shape does not fit the base."""
    modules = dict(model.named_modules())
    missing, wrong = [], []
    for name, (a, b) in adapter.lora.items():
        layer = modules.get(name)
        if layer is None or not isinstance(layer, (nn.Linear, LoraLinear)):
            missing.append(name)
        elif a.shape[1] != layer.in_features or b.shape[0] != layer.out_features or a.shape[0] != b.shape[1]:
            wrong.append(f"{name}: adapter A{tuple(a.shape)} B{tuple(b.shape)} vs base "
                         f"[{layer.out_features}, {layer.in_features}]")
    for name, params in adapter.copies.items():
        module = modules.get(name)
        if module is None:
            missing.append(name)
            continue
        own = dict(module.named_parameters()) if not isinstance(module, TrainableCopy) else dict(module.original.named_parameters())
        for pname, t in params.items():
            if pname in own and own[pname].shape != t.shape:
                wrong.append(f"{name}.{pname}: adapter {tuple(t.shape)} vs base {tuple(own[pname].shape)} "
                             "(resize the token embeddings to the adapter's vocabulary first)")
    if missing or wrong:
        lines = ([f"modules not in this model: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"] if missing else []) + wrong[:5]
        raise AdapterMismatchError(f"{path}: adapter does not fit this base model (was it trained on another "
                                   f"model?); " + "; ".join(lines))


def load_adapter(model: nn.Module, path: str | Path, name: str = "default", activate: bool = True,
                 rank: int | None = None) -> LoraConfig:
    """Load an adapter folder (saved by qlora-kit or PEFT) onto ``model`` as adapter ``name``.

    Several adapters can live on one base under different names; ``activate`` makes this one the active one.
    A dynamic-rank adapter runs at ``rank`` if given, else at its saved ``lora.active_rank`` (r by default);
    ``set_rank(model, k, name)`` changes it later. ``rank`` is an error for an ordinary adapter.
    Raises AdapterMismatchError before changing the model when names or shapes differ from the base.
    """
    path = Path(path)
    adapter = read_adapter(path)
    if name in getattr(model, "lora_configs", {}):
        raise ValueError(f"an adapter named {name!r} is already loaded; pick another name")
    check_matches(model, adapter, path)
    if rank is not None:
        if not adapter.config.dynamic_rank:
            raise ConfigError(f"{path}: rank={rank} given, but this is not a dynamic-rank adapter; its rank is "
                              f"fixed at {adapter.config.r} (use adapter-resize to shrink it)")
        if not 1 <= rank <= adapter.config.r:
            raise ConfigError(f"{path}: rank={rank} must be in [1, {adapter.config.r}]")
        adapter.config.active_rank = rank
    previous = active_adapters(model)
    attach_adapter(model, sorted(adapter.lora), adapter.config, name)
    assign_adapter(model, adapter, name)
    if adapter.config.dynamic_rank:
        set_rank(model, inference_rank(adapter.config), name)
    if not activate:
        set_active_adapters(model, previous)
    return adapter.config


def assign_adapter(model: nn.Module, adapter: AdapterFile, name: str = "default") -> None:
    """Copy an adapter file's tensors into the existing adapter ``name`` of ``model`` (shapes must match)."""
    layers = dict(lora_layers(model))
    with torch.no_grad():
        for module, (a, b) in adapter.lora.items():
            target = layers[module].adapters[name]
            target.lora_A.copy_(a)
            target.lora_B.copy_(b)
        for module, params in adapter.copies.items():
            own = dict(model.get_submodule(module).copies[name].named_parameters())
            for pname, t in params.items():
                own[pname].copy_(t)
