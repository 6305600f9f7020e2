"""The workflow entry points of the public API that need the whole package: a config from YAML with the
"demo" alias resolved, and ``train`` from a config object or a YAML file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qlora_kit.config import TrainConfig
from qlora_kit.config import load_train_config as _load_config_file
from qlora_kit.demo.model import resolve_model_path
from qlora_kit.training.recipe import train as _train
from qlora_kit.training.run import TrainResult


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (optional) and ``key=value`` overrides into a validated TrainConfig.

    ``model.path: demo`` becomes the cached demo model (SmolLM2-135M-Instruct, converted on first use). Raises
    ConfigError naming the file, the line and the key, and the fix.
    """
    return _load_config_file(path, overrides, resolve_model=resolve_model_path)


def train(config: TrainConfig | str | Path, *overrides: str, resume: bool = False, progress: bool = True,
          force: bool = False, overwrite: bool = False) -> TrainResult:
    """Fine-tune from a TrainConfig, or from a YAML file plus ``key=value`` overrides, as ``qlora-kit train`` does.

    Writes the run (adapter, checkpoints, metrics.jsonl, loss.png, summary.json) to ``training.output_dir`` and
    returns a TrainResult. ``resume`` continues from the newest verified checkpoint; ``overwrite`` and ``force``
    are the CLI's flags. Raises ConfigError/DataError for bad input (before any weight is loaded) and
    RunDiverged when the run's health checks stop it.
    """
    if not isinstance(config, TrainConfig):
        config = load_train_config(config, list(overrides))
    elif config.model.path == "demo":  # a copy: the caller's config keeps its alias
        model = dataclasses.replace(config.model, path=str(resolve_model_path("demo")))
        config = dataclasses.replace(config, model=model)
    return _train(config, resume=resume, progress=progress, force=force, overwrite=overwrite)
