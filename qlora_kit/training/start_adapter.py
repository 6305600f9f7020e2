"""Start training from a saved adapter (``model.adapter``), e.g. DPO after an SFT adapter.

``start_config`` reads the adapter folder before any weight is loaded and returns the run's config with the
LoRA section the adapter dictates: its rank, alpha, rsLoRA scaling, modules_to_save and exactly its adapted
modules. A ``lora.*`` value the user set (anything but the field's default) that disagrees with the adapter is
an error, never silently overridden. With the model's module tree (built on the meta device, no weights) the
adapter's modules and shapes are checked too. ``load_start_weights`` then copies the adapter into the
trainable adapter after ``add_lora`` and, when DPO's reference is the adapter, keeps a frozen copy of it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

from torch import nn

from qlora_kit.config import ConfigError, LoraConfig, TrainConfig
from qlora_kit.model.adapter_check import CONFIG_FILE, WEIGHTS_FILE
from qlora_kit.model.adapters import (
    AdapterFile,
    AdapterMismatchError,
    assign_adapter,
    check_matches,
    read_adapter,
)
from qlora_kit.model.lora import resolve_targets
from qlora_kit.model.reference import freeze_reference
from qlora_kit.training.manifest import file_digest

log = logging.getLogger("qlora_kit")

_TAKEN = ("r", "alpha", "use_rslora", "modules_to_save")  # LoRA fields the adapter's file decides


def read_start_adapter(config: TrainConfig) -> AdapterFile:
    """The adapter folder ``model.adapter``, checked; ConfigError naming ``model.adapter`` when it is unusable."""
    path = Path(config.model.adapter)
    if not path.is_dir():
        raise ConfigError(f"model.adapter: {str(path)!r} is not a folder; give the folder holding "
                          "adapter_config.json and adapter_model.safetensors (e.g. <sft run>/adapter)")
    try:
        return read_adapter(path)
    except ConfigError as e:
        raise ConfigError(f"model.adapter: {e}") from None


def _conflict(key: str, mine, theirs, path: Path) -> ConfigError:
    return ConfigError(f"lora.{key}={mine!r} conflicts with model.adapter ({key}={theirs!r} in {path}); the "
                       f"training starts from that adapter, so remove lora.{key} or set it to {theirs!r}")


def _merged_lora(lora: LoraConfig, adapter: AdapterFile, path: Path) -> LoraConfig:
    """``lora`` with the adapter's rank, alpha, scaling, modules_to_save and modules; ConfigError on a conflict."""
    default = LoraConfig()
    for key in _TAKEN:
        mine, theirs = getattr(lora, key), getattr(adapter.config, key)
        if mine != getattr(default, key) and mine != theirs:
            raise _conflict(key, mine, theirs, path)
    taken = {key: getattr(adapter.config, key) for key in _TAKEN}
    return dataclasses.replace(lora, **taken, target_modules=sorted(adapter.lora), layers=None,
                               active_rank=min(lora.active_rank, adapter.config.r))


def _check_modules(skeleton: nn.Module, user: LoraConfig, adapter: AdapterFile, path: Path) -> None:
    """The adapter's modules exist with its shapes, and equal the user's targets when the user gave some."""
    try:
        check_matches(skeleton, adapter, path)
    except AdapterMismatchError as e:
        raise ConfigError(f"model.adapter: {e}") from None
    if user.target_modules == "all-linear" and user.layers is None:
        return
    wanted = set(resolve_targets(skeleton, user))
    if wanted != set(adapter.lora):
        extra, missing = sorted(wanted - set(adapter.lora)), sorted(set(adapter.lora) - wanted)
        raise ConfigError(f"lora.target_modules={user.target_modules!r} (layers={user.layers}) selects other layers "
                          f"than model.adapter ({path}) adapts: {len(extra)} more ({', '.join(extra[:3])}), "
                          f"{len(missing)} fewer ({', '.join(missing[:3])}); remove lora.target_modules/layers to "
                          "train exactly the adapter's layers")


def start_config(config: TrainConfig, skeleton: nn.Module | None) -> TrainConfig:
    """``config`` with the LoRA section of ``model.adapter`` (a copy; ``config`` is unchanged), checked against
    the model's module tree ``skeleton`` when there is one. Raises ConfigError naming the field and the fix."""
    path = Path(config.model.adapter)
    adapter = read_start_adapter(config)
    if skeleton is not None:
        _check_modules(skeleton, config.lora, adapter, path)
    lora = _merged_lora(config.lora, adapter, path)
    lora.validate("lora (with model.adapter's settings)")
    if adapter.quant is not None and adapter.quant != config.quant:
        log.warning("model.adapter %s was trained against quant %s; this run quantizes the base with %s",
                    path, dataclasses.asdict(adapter.quant), dataclasses.asdict(config.quant))
    return dataclasses.replace(config, lora=lora)


def start_digest(config: TrainConfig) -> str:
    """sha256 over ``model.adapter``'s two files ("" without a starting adapter): what a checkpoint records so a
    resume with another starting adapter (another DPO reference) is refused."""
    if not config.model.adapter:
        return ""
    folder = Path(config.model.adapter)
    return hashlib.sha256("".join(file_digest(folder / n)[1] for n in (CONFIG_FILE, WEIGHTS_FILE)).encode()).hexdigest()


def load_start_weights(model: nn.Module, config: TrainConfig) -> None:
    """Copy ``model.adapter``'s weights into the trainable adapter "default" (``add_lora`` made it from
    ``start_config``'s LoRA section) and, for DPO against the adapter, freeze a copy as the reference. Logs
    which reference DPO uses."""
    if config.model.adapter:
        assign_adapter(model, read_start_adapter(config))
        log.info("starting from adapter %s (%d layers, r=%d)", config.model.adapter,
                 len(config.lora.target_modules), config.lora.r)
    if config.training.objective != "dpo":
        return
    if config.reference == "adapter":
        freeze_reference(model)
        log.info("DPO reference: the frozen starting adapter %s (training.dpo_reference=%s)", config.model.adapter,
                 config.training.dpo_reference)
    else:
        log.info("DPO reference: the base model with adapters disabled (training.dpo_reference=%s)",
                 config.training.dpo_reference)
