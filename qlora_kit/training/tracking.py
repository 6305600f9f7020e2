"""Experiment tracking (``training.report_to``) through accelerate's tracker API: TensorBoard, W&B, MLflow.

Offline by default and inside the run folder: every tracker writes under ``<output_dir>/tracking``; W&B runs
offline unless ``WANDB_MODE`` is set; MLflow uses a file store there unless ``MLFLOW_TRACKING_URI`` is set. The
trackers receive exactly the records of ``metrics.jsonl`` (``MetricsLog.write`` hands each one to ``log_record``).
A resumed run continues the same tracker run: the W&B and MLflow run ids are kept in ``tracking/run_ids.json``,
and TensorBoard purges the events past the resumed step, as ``metrics.jsonl`` drops its lines past it.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from qlora_kit.atomic import atomic_write_json
from qlora_kit.config import TrainConfig, to_dict

PROJECT = "qlora-kit"  # the tracker project; TensorBoard's events go to <output_dir>/tracking/qlora-kit
_IDS = "run_ids.json"  # W&B / MLflow run ids of this run folder, so a resume continues the same run


def tracking_dir(output_dir: str | Path) -> Path:
    """Where the trackers of a run write: ``<output_dir>/tracking``."""
    return Path(output_dir) / "tracking"


def accelerator_kwargs(config: TrainConfig) -> dict:
    """``log_with``/``project_dir`` for ``Accelerator(...)``: nothing when ``training.report_to`` is empty."""
    names = config.training.report_to
    if not names:
        return {}
    return {"log_with": list(names), "project_dir": str(tracking_dir(config.training.output_dir))}


def flat_config(config: TrainConfig) -> dict:
    """The config as ``section.key`` -> bool/int/float/str (the value types every tracker accepts)."""
    flat = {}
    for section, values in to_dict(config).items():
        for key, value in values.items():
            ok = isinstance(value, (bool, int, float, str))
            flat[f"{section}.{key}"] = value if ok else json.dumps(value)
    return flat


def tracker_kwargs(names: list[str], folder: Path, ids: dict, resume_step: int) -> dict:
    """Per-tracker keyword arguments: local folders, offline W&B, the saved run ids, TensorBoard's purge step."""
    kwargs: dict = {}
    if "tensorboard" in names and resume_step:
        kwargs["tensorboard"] = {"purge_step": resume_step + 1}  # drop events logged after the checkpoint
    if "wandb" in names:
        kwargs["wandb"] = {"dir": str(folder), "id": ids.setdefault("wandb", uuid.uuid4().hex[:12]),
                           "resume": "allow", "name": folder.parent.name}
        if not os.environ.get("WANDB_MODE"):
            kwargs["wandb"]["mode"] = "offline"
    if "mlflow" in names:
        kwargs["mlflow"] = {"logging_dir": str(folder / "mlflow-artifacts"), "run_id": ids.get("mlflow"),
                            "run_name": folder.parent.name}
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            mlflow.set_tracking_uri((folder / "mlruns").resolve().as_uri())
    return kwargs


def start_tracking(accelerator, config: TrainConfig, resume_step: int) -> None:
    """Start the trackers of ``training.report_to`` (main process; a no-op without any), logging the config.

    ``resume_step``: the step a resumed run continues from (0 for a new run); the same tracker runs continue.
    """
    names = config.training.report_to
    if not names or not accelerator.is_main_process:
        return
    folder = tracking_dir(config.training.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    ids_file = folder / _IDS
    ids = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
    kwargs = tracker_kwargs(names, folder, ids, resume_step)
    accelerator.init_trackers(PROJECT, config=flat_config(config) if not resume_step else None, init_kwargs=kwargs)
    if "mlflow" in names:
        ids["mlflow"] = accelerator.get_tracker("mlflow", unwrap=True).info.run_id
    if ids:
        atomic_write_json(ids_file, ids)


def log_record(accelerator, record: dict) -> None:
    """Send one metrics.jsonl record to the trackers: its numbers, at its ``step``."""
    values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
              and not isinstance(v, bool)}
    accelerator.log(values, step=record["step"])
