"""Faults lose nothing and explain themselves: atomic writes, a full disk, inf gradients, no code from data,
reproducible runs. (Interruptions of a real process: test_interrupt.py; bad input: test_validate.py;
fuzzing: test_fuzz.py.)"""
from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_tiny

from qlora_kit import LoraConfig, add_lora, load_adapter, merge_and_export, save_adapter
from qlora_kit.atomic import WriteError
from qlora_kit.config import ConfigError, load_train_config, to_dict
from qlora_kit.model.load import check_model_path
from qlora_kit.model.lora import lora_layers
from qlora_kit.training.checkpoint import (
    STATE_FILE,
    latest_checkpoint,
    load_optimizer_state,
    load_trainer_state,
)
from qlora_kit.training.recipe import train
from qlora_kit.training.run import TrainingError

PACKAGE = Path(__file__).resolve().parent.parent / "qlora_kit"
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "robot"]


def _config(folder: Path, model_dir: Path, **training):
    """A tiny, fast run: 16 examples, batch 4, fp32 compute, a checkpoint every step."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Spell {w}.", "output": w.upper()}) + "\n" for w in WORDS * 2))
    settings = {"max_steps": 4, "save_every": 1, "batch_size": 4, "optimizer": "adamw", "lr": 5e-3,
                "gradient_checkpointing": "off", **training}
    overrides = [f"model.path={model_dir}", f"data.train_file={data}", "data.max_seq_len=64", "model.compute_dtype=fp32",
                 "model.device=cpu", "lora.r=4", "lora.alpha=8", f"training.output_dir={folder / 'run'}"]
    return load_train_config(None, overrides + [f"training.{k}={v}" for k, v in settings.items()])


def _adapter_bytes(run: Path) -> bytes:
    return (run / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    """An uninterrupted 4-step run (the reference for the runs below)."""
    folder = tmp_path_factory.mktemp("straight")
    config = _config(folder, tiny_model_dir)
    train(config, progress=False)
    return folder / "run", config


# ---------------------------------------------------------------------------------------------
# Reproducibility


def test_same_seed_and_config_give_the_same_adapter_bytes_and_the_run_records_them(straight, tiny_model_dir, tmp_path):
    run, config = straight
    again = _config(tmp_path / "again", tiny_model_dir)
    train(again, progress=False)
    assert _adapter_bytes(tmp_path / "again" / "run") == _adapter_bytes(run)
    other = _config(tmp_path / "other", tiny_model_dir, seed=7)
    train(other, progress=False)
    assert _adapter_bytes(tmp_path / "other" / "run") != _adapter_bytes(run)  # the seed matters

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved == to_dict(config)  # the whole resolved config, defaults included
    info = json.loads((run / "run_info.json").read_text())
    assert info["seed"] == 42 == saved["training"]["seed"]
    for pkg in ("torch", "transformers", "bitsandbytes", "accelerate", "safetensors"):
        assert re.match(r"\d+\.\d+", info["versions"][pkg]), (pkg, info["versions"])


# ---------------------------------------------------------------------------------------------
# Atomic writes


def test_a_checkpoint_write_cut_off_midway_is_never_resumed_from(straight, tiny_model_dir, tmp_path, monkeypatch):
    """An exception inside the checkpoint's atomic_dir, with the temp folder's cleanup disabled (as after a
    kill): the half-written folder stays behind, resume ignores it and ends bit-identical."""
    import qlora_kit.atomic
    import qlora_kit.training.checkpoint

    real = qlora_kit.training.checkpoint.safetensors_bytes
    calls = {"n": 0}

    def cut_off(*a, **k):  # the optimizer state of the 3rd checkpoint: after its adapter files are written
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("power cut")
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(qlora_kit.training.checkpoint, "safetensors_bytes", cut_off)
        m.setattr(qlora_kit.atomic.shutil, "rmtree", lambda *a, **k: None)  # no cleanup, as after kill -9
        with pytest.raises(RuntimeError, match="power cut"):
            train(_config(tmp_path, tiny_model_dir), progress=False)
    root = tmp_path / "run" / "checkpoints"
    partial = [p for p in root.iterdir() if p.name.startswith(".step-000003")]
    assert len(partial) == 1 and (partial[0] / "adapter_model.safetensors").is_file()
    assert not (partial[0] / STATE_FILE).exists() and not (root / "step-000003").exists()
    assert latest_checkpoint(root).name == "step-000002"
    result = train(_config(tmp_path, tiny_model_dir), resume=True, progress=False)
    assert result.status == "completed" and result.steps == 4
    assert _adapter_bytes(tmp_path / "run") == _adapter_bytes(straight[0])


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A non-trivial saved adapter for the tiny model."""
    model, _ = load_tiny(tiny_model_dir)
    add_lora(model, LoraConfig(r=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.adapters["default"].lora_B.copy_(torch.randn(layer.adapters["default"].lora_B.shape, generator=g) * 0.1)
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "adapter")


_KILLED_EXPORT = """
import sys, time
from pathlib import Path
import qlora_kit.merging.write as export
real, n = export.merged_tensor, [0]
def slow(*a, **k):
    n[0] += 1
    if n[0] == 3:  # two tensors are on disk: announce it, then hang until killed
        Path(sys.argv[4]).touch()
        time.sleep(120)
    return real(*a, **k)
export.merged_tensor = slow
from qlora_kit.merging.pipeline import merge_and_export
merge_and_export(sys.argv[1], sys.argv[2], sys.argv[3], verify=False, shard_size="40KB", progress=False)
"""


def test_an_export_killed_midway_is_never_mistaken_for_a_complete_one(tiny_model_dir, adapter_dir, tmp_path):
    out, ready = tmp_path / "merged", tmp_path / "writing"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_EXPORT, str(tiny_model_dir), str(adapter_dir), str(out),
                             str(ready)], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the export never started writing"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.tmp-")]
    assert len(leftovers) == 1 and any(leftovers[0].glob("*.safetensors"))  # it was killed mid-write
    with pytest.raises(ConfigError, match="no such folder"):
        check_model_path(out)
    report = merge_and_export(tiny_model_dir, adapter_dir, out, verify=False, progress=False)  # no --overwrite needed
    assert (out / "merge_report.json").is_file() and report["shards"] >= 1
    check_model_path(out)


# ---------------------------------------------------------------------------------------------
# Disk full


def _enospc_on(monkeypatch, name: str, folder_part: str):
    """Path.write_bytes raises ENOSPC for a file called ``name`` inside a folder whose name contains ``folder_part``."""
    real = pathlib.Path.write_bytes

    def write_bytes(self, data):
        if self.name == name and folder_part in self.parent.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)


def test_disk_full_during_a_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        _enospc_on(m, "optimizer.safetensors", "step-000003")
        with pytest.raises(WriteError, match=r"step-000003: no space left on device; nothing was replaced "
                                             r"\(free disk space and retry\)"):
            train(_config(tmp_path, tiny_model_dir), progress=False)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000001", "step-000002"]  # no temp folder left
    previous = root / "step-000002"
    assert load_trainer_state(previous)["step"] == 2 and load_optimizer_state(previous)["state"]
    assert not (tmp_path / "run" / "adapter").exists()  # the run does not look finished
    assert train(_config(tmp_path, tiny_model_dir), resume=True, progress=False).steps == 4  # space freed: resume


class _FullDisk:
    """A file object whose writes fail with ENOSPC once ``budget`` bytes are written."""

    def __init__(self, f, budget):
        self.f, self.budget = f, budget

    def write(self, data):
        self.budget -= len(data)
        if self.budget < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_during_an_export_keeps_the_previous_export(tiny_model_dir, adapter_dir, tmp_path, monkeypatch):
    import qlora_kit.merging.write

    out = tmp_path / "merged"
    merge_and_export(tiny_model_dir, adapter_dir, out, verify=False, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(qlora_kit.merging.write, "open", lambda *a, **k: _FullDisk(open(*a, **k), 50_000), raising=False)
    with pytest.raises(WriteError, match=r"merged: no space left on device; nothing was replaced"):
        merge_and_export(tiny_model_dir, adapter_dir, out, overwrite=True, verify=False, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # and no half-written folder beside it

    fresh = tmp_path / "fresh"
    with pytest.raises(WriteError, match="no space left on device"):
        merge_and_export(tiny_model_dir, adapter_dir, fresh, verify=False, progress=False)
    assert not fresh.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


# ---------------------------------------------------------------------------------------------
# Numerical faults


def _inf_gradient_at(monkeypatch, step: int):
    """Make one LoRA gradient inf during optimizer step ``step`` (grad_accum=1: one backward per step)."""
    import qlora_kit.training.setup as train_mod

    real = train_mod.add_lora
    backward = {"n": 0}

    def add_lora_with_hook(model, config, *a, **k):
        targets = real(model, config, *a, **k)
        b = next(layer for _, layer in lora_layers(model)).adapters["default"].lora_B

        def poison(grad):
            backward["n"] += 1
            return torch.full_like(grad, float("inf")) if backward["n"] == step else grad

        b.register_hook(poison)
        return targets

    monkeypatch.setattr(train_mod, "add_lora", add_lora_with_hook)


def test_an_inf_gradient_stops_naming_the_step_and_keeps_the_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    _inf_gradient_at(monkeypatch, 3)
    with pytest.raises(TrainingError, match=r"step 3: loss [\d.]+, gradient norm inf is not finite; stopped\. "
                                            r"The last good checkpoint is .*step-000002"):
        train(_config(tmp_path, tiny_model_dir), progress=False)
    kept = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert kept.name == "step-000002" and load_trainer_state(kept)["step"] == 2
    a = load_optimizer_state(kept)
    assert all(torch.isfinite(t).all() for s in a["state"].values() for t in s.values() if torch.is_tensor(t))


def test_an_inf_gradient_is_skipped_when_configured(tiny_model_dir, tmp_path, monkeypatch, caplog):
    _inf_gradient_at(monkeypatch, 3)
    with caplog.at_level(logging.WARNING, logger="qlora_kit"):
        result = train(_config(tmp_path, tiny_model_dir, on_nonfinite="skip"), progress=False)
    assert result.status == "completed" and result.steps == 4
    assert any("step 3" in r.message and "skipped" in r.message for r in caplog.records)
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 4]
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors").values())


# ---------------------------------------------------------------------------------------------
# No code from data


class _Payload:
    """Unpickling this creates ``marker``: a stand-in for arbitrary code in a pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(folder: Path, marker: Path, names: list[str]) -> None:
    """Write pickle payloads (raw pickle and torch.save's zip format) under ``names`` in ``folder``."""
    for i, name in enumerate(names):
        if i % 2:
            torch.save({"state": _Payload(marker)}, folder / name)
        else:
            (folder / name).write_bytes(pickle.dumps({"state": _Payload(marker)}))


CHECKPOINT_BAIT = ["optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "adapter_model.bin",
                   "pytorch_model.bin", "trainer_state.pkl"]


def test_the_payload_is_live(tmp_path):
    """Sanity: unpickling the planted files really would run code."""
    marker = tmp_path / "marker"
    _plant(tmp_path, marker, ["a.bin", "b.pt"])
    pickle.loads((tmp_path / "a.bin").read_bytes())
    assert marker.exists()
    marker.unlink()
    torch.load(tmp_path / "b.pt", weights_only=False)
    assert marker.exists()


def test_pickle_in_a_checkpoint_is_never_executed_on_resume(tiny_model_dir, tmp_path):
    marker = tmp_path / "marker"
    train(_config(tmp_path, tiny_model_dir, max_steps=2), progress=False)
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    _plant(ckpt, marker, CHECKPOINT_BAIT)
    result = train(_config(tmp_path, tiny_model_dir, max_steps=3), resume=True, progress=False)
    assert result.steps == 3 and not marker.exists()


def test_pickle_in_adapter_and_model_folders_is_never_executed(tiny_model_dir, adapter_dir, tmp_path, caplog):
    marker = tmp_path / "marker"
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir, adapter)
    _plant(adapter, marker, ["adapter_model.bin", "training_args.bin", "optimizer.pt"])
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    _plant(base, marker, ["pytorch_model.bin", "training_args.bin", "optimizer.pt"])

    model, _ = load_tiny(base)  # a folder with both: only the safetensors are read
    load_adapter(model, adapter)
    (adapter / "adapter_model.safetensors").unlink()  # only the pickle left: refused with the reason
    with pytest.raises(ConfigError, match=r"never loads pickled adapter_model\.bin"):
        load_adapter(model, adapter, name="second")
    (base / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"never loads pickled \*\.bin weights"):
        load_tiny(base)
    assert not marker.exists()


def test_remote_code_in_a_checkpoint_never_runs_unless_turned_on(tiny_model_dir, tmp_path, caplog):
    from qlora_kit.training.validate import validate_run

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    marker = tmp_path / "marker"
    (base / "evil.py").write_text(f"open({str(marker)!r}, 'w')\nfrom transformers import LlamaForCausalLM as EvilModel\n")
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (base / "config.json").write_text(json.dumps(config))

    with caplog.at_level(logging.WARNING, logger="qlora_kit"):
        load_tiny(base)
        data = tmp_path / "d.jsonl"
        data.write_text(json.dumps({"instruction": "hi", "output": "yo"}) + "\n")
        validate_run(load_train_config(None, [f"model.path={base}", f"data.train_file={data}",
                                              f"training.output_dir={tmp_path / 'run'}"]))
    assert not marker.exists()
    assert not any("trust_remote_code" in r.message for r in caplog.records if r.name == "qlora_kit")
    assert load_train_config(None, ["model.path=x", "data.train_file=y"]).model.trust_remote_code is False

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qlora_kit"):
        load_tiny(tiny_model_dir, trust_remote_code=True)  # a plain checkpoint: nothing to run, but warned
    assert any("trust_remote_code=True" in r.message and r.levelno == logging.WARNING for r in caplog.records)


def test_the_package_never_unpickles():
    """No pickle, no torch.load without weights_only=True, no numpy allow_pickle anywhere in the package."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        for pattern in (r"^\s*(import|from)\s+(pickle|cPickle|dill|cloudpickle|joblib)\b", r"\bpickle\.loads?\(",
                        r"allow_pickle\s*=\s*True", r"use_safetensors\s*=\s*False"):
            offenders += [f"{path.name}: {m.group(0).strip()}" for m in re.finditer(pattern, text, re.M)]
        for call in re.finditer(r"torch\.load\(([^()]*(\([^()]*\))?)*\)", text):
            if "weights_only=True" not in call.group(0):
                offenders.append(f"{path.name}: {call.group(0)}")
    assert not offenders, offenders
    assert "use_safetensors=True" in (PACKAGE / "model" / "load.py").read_text()
