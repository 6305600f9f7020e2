"""Checkpoints are verified before they are trusted: a manifest written last, verify_checkpoint, the fallback
to the newest checkpoint that verifies on resume, clear errors from the loaders, rotation around bad ones.

The runs here train the tiny model for 4 steps (a checkpoint every step). ``interrupted`` stops after step 3;
each corruption of its step-000003 must be reported by file and the resume must fall back to step-000002
and end bit-identical to a run never interrupted (which it cannot if it resumed from the corrupted one).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from qlora_kit.cli import _is_user_error
from qlora_kit.config import ConfigError, load_train_config
from qlora_kit.training.checkpoint import (
    STATE_FILE,
    CheckpointError,
    latest_good_checkpoint,
    list_checkpoints,
    load_optimizer_state,
    load_trainer_state,
    read_checkpoint_adapter,
    save_checkpoint,
    verify_checkpoint,
)
from qlora_kit.training.manifest import MANIFEST_FILE
from qlora_kit.training.recipe import train

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "robot"]
ADAPTER, OPT, OPT_JSON = "adapter_model.safetensors", "optimizer.safetensors", "optimizer.json"
ALL_FILES = ["adapter_config.json", ADAPTER, OPT, OPT_JSON, STATE_FILE]


def _settings(folder: Path, model_dir: Path) -> dict:
    """A tiny run as a config dict: 16 examples, batch 4, fp32, 4 steps, a checkpoint every step, 3 kept."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Spell {w}.", "output": w.upper()}) + "\n" for w in WORDS * 2))
    return {"model": {"path": str(model_dir), "compute_dtype": "fp32", "device": "cpu"},
            "lora": {"r": 4, "alpha": 8}, "data": {"train_file": str(data), "max_seq_len": 64},
            "training": {"output_dir": str(folder / "run"), "batch_size": 4, "optimizer": "adamw", "lr": 5e-3,
                         "gradient_checkpointing": "off", "max_steps": 4, "save_every": 1, "keep_checkpoints": 3}}


def _config(folder: Path, model_dir: Path):
    path = folder / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(_settings(folder, model_dir)))
    return load_train_config(str(path))


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> bytes:
    """The adapter bytes of the 4-step run, never interrupted."""
    folder = tmp_path_factory.mktemp("reference")
    return train(_config(folder, tiny_model_dir), progress=False).adapter_dir.joinpath(ADAPTER).read_bytes()


@pytest.fixture(scope="module")
def interrupted(tiny_model_dir, tmp_path_factory) -> Path:
    """A 4-step run stopped by SIGINT after step 3: checkpoints step-000001..3, no final adapter."""
    from qlora_kit.training import metrics

    folder = tmp_path_factory.mktemp("interrupted")
    original = metrics.MetricsLog.write

    def write(self, record):
        original(self, record)
        if record.get("step") == 3 and "loss" in record:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(metrics.MetricsLog, "write", write)
        result = train(_config(folder, tiny_model_dir), progress=False)
    assert result.status == "interrupted" and result.steps == 3
    return folder / "run"


def _copy_run(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run" / "checkpoints"


def _poke(path: Path, key_part: str, value: float) -> str:
    """Overwrite the first float32 of the first tensor whose name contains ``key_part``, in place."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    key = next(k for k in sorted(header) if key_part in k)
    assert header[key]["dtype"] == "F32"
    start = 8 + n + header[key]["data_offsets"][0]
    raw[start:start + 4] = struct.pack("<f", value)
    path.write_bytes(bytes(raw))
    return key


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _break_json(path: Path) -> None:
    path.write_text(path.read_text()[:-10])


CORRUPTIONS = {  # name -> (damage to step-000003, the problem line verify_checkpoint must give)
    "truncated adapter": (lambda c: _truncate(c / ADAPTER),
                          r"adapter_model\.safetensors: \d+ bytes, the manifest says \d+ \(truncated"),
    "truncated optimizer": (lambda c: _truncate(c / OPT), r"optimizer\.safetensors: \d+ bytes, the manifest says"),
    "deleted optimizer.json": (lambda c: (c / OPT_JSON).unlink(), r"optimizer\.json: missing"),
    "broken trainer_state": (lambda c: _break_json(c / STATE_FILE), r"trainer_state\.json: \d+ bytes, the manifest"),
    "1e30 in a lora_B": (lambda c: _poke(c / ADAPTER, "lora_B", 1e30),
                         r"adapter_model\.safetensors: sha256 differs from the manifest \(changed or corrupted"),
}


# ---------------------------------------------------------------------------------------------
# The manifest and verify_checkpoint


def test_the_manifest_lists_size_and_sha256_of_every_file(interrupted):
    for ckpt in list_checkpoints(interrupted / "checkpoints"):
        manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
        assert manifest["format"] == "qlora-kit-manifest" and manifest["version"] == 1
        assert sorted(manifest["files"]) == sorted(ALL_FILES)
        for name, entry in manifest["files"].items():  # against hashlib over the bytes on disk
            data = (ckpt / name).read_bytes()
            assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
        assert verify_checkpoint(ckpt) == []


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_each_corruption_is_named_by_file(interrupted, tmp_path, case):
    ckpt = _copy_run(interrupted, tmp_path) / "step-000003"
    damage, expected = CORRUPTIONS[case]
    damage(ckpt)
    problems = verify_checkpoint(ckpt)
    assert len(problems) == 1 and re.match(expected, problems[0]), problems


def _damages(ckpt: Path):
    """Every way to damage one checkpoint tried below: (description, function of the folder)."""
    for name in ALL_FILES + [MANIFEST_FILE]:
        for keep in (0, 1, 8, 100, -2):
            yield f"{name} cut to {keep}", lambda c, n=name, k=keep: (c / n).write_bytes((c / n).read_bytes()[:k])
        yield f"{name} deleted", lambda c, n=name: (c / n).unlink()
        yield f"{name} garbage", lambda c, n=name: (c / n).write_bytes(os.urandom((c / n).stat().st_size))
        yield f"{name} a directory", lambda c, n=name: ((c / n).unlink(), (c / n).mkdir())
    for value in (1e30, float("nan"), float("inf")):
        yield f"lora_B = {value}", lambda c, v=value: _poke(c / ADAPTER, "lora_B", v)
        yield f"optimizer tensor = {value}", lambda c, v=value: _poke(c / OPT, "", v)
    for text in ('{"step": -1}', '{"step": "3"}', "[]", '{"step": 3, "best_eval_loss": "low"}', "[" * 100_000):
        yield f"trainer_state {text[:20]}", lambda c, t=text: (c / STATE_FILE).write_text(t)
    manifests = ({}, {"format": "qlora-kit-manifest", "version": 9, "files": {}},
                 {"format": "qlora-kit-manifest", "version": 1, "files": {"../x": {"size": 1, "sha256": "0"}}},
                 {"format": "qlora-kit-manifest", "version": 1, "files": {ADAPTER: 5}})
    for text in map(json.dumps, manifests):
        yield f"manifest {text[:30]}", lambda c, t=text: (c / MANIFEST_FILE).write_text(t)
    yield "optimizer.json points at a tensor that is not there", \
        lambda c: (c / OPT_JSON).write_text(json.dumps({"__tensor__": "nope"}))
    yield "folder replaced by a file", lambda c: (shutil.rmtree(c), c.write_text("x"))


def test_verify_never_raises_and_rejects_every_damage(interrupted, tmp_path):
    """With a manifest every damage is caught; without one (an old checkpoint) verification still answers,
    and finds everything that no longer parses."""
    source = interrupted / "checkpoints" / "step-000003"
    legacy = tmp_path / "legacy" / "step-000003"
    shutil.copytree(source, legacy)
    (legacy / MANIFEST_FILE).unlink()
    state = json.loads((legacy / STATE_FILE).read_text())
    (legacy / STATE_FILE).write_text(json.dumps({k: v for k, v in state.items() if k != "manifest_version"}) + "\n")
    assert verify_checkpoint(legacy) == []
    tried = 0
    for kind, original in (("manifest", source), ("legacy", legacy)):
        for i, (what, damage) in enumerate(_damages(original)):
            if kind == "legacy" and MANIFEST_FILE in what:
                continue
            ckpt = tmp_path / kind / f"{i}" / "step-000003"
            shutil.copytree(original, ckpt)
            damage(ckpt)
            problems = verify_checkpoint(ckpt)
            assert isinstance(problems, list) and all(isinstance(p, str) and "\n" not in p for p in problems), what
            undetectable = kind == "legacy" and "1e+30" in what  # finite and parses: only a manifest can tell
            assert problems or undetectable, (kind, what)
            tried += 1
    assert tried > 100


def test_a_checkpoint_without_a_manifest_is_judged_by_parsing(interrupted, tmp_path):
    """Checkpoints written before manifests are accepted when every file parses and is finite; a deleted
    manifest of a checkpoint that had one is not."""
    ckpt = _copy_run(interrupted, tmp_path) / "step-000003"
    (ckpt / MANIFEST_FILE).unlink()
    assert verify_checkpoint(ckpt) == [f"{MANIFEST_FILE}: missing, but this checkpoint was written with one "
                                       "(deleted or copied incompletely)"]
    state = json.loads((ckpt / STATE_FILE).read_text())
    del state["manifest_version"]
    (ckpt / STATE_FILE).write_text(json.dumps(state))  # now as an old qlora-kit wrote it
    assert verify_checkpoint(ckpt) == []
    key = _poke(ckpt / ADAPTER, "lora_B", float("nan"))
    module_key = key.removeprefix("base_model.model.")
    assert verify_checkpoint(ckpt) == [f"{ADAPTER}: 1 tensor(s) hold NaN/inf values (first: {module_key})"]


def test_the_loaders_raise_a_checkpoint_error_naming_the_file(interrupted, tmp_path):
    ckpt = _copy_run(interrupted, tmp_path) / "step-000003"
    _truncate(ckpt / OPT)
    _break_json(ckpt / STATE_FILE)
    _truncate(ckpt / ADAPTER)
    for load, name in ((load_optimizer_state, OPT), (load_trainer_state, STATE_FILE), (read_checkpoint_adapter, ADAPTER)):
        with pytest.raises(CheckpointError) as e:
            load(ckpt)
        assert str(e.value).startswith(f"{ckpt}: {name}") and "\n" not in str(e.value), str(e.value)
        assert isinstance(e.value, ConfigError) and _is_user_error(e.value)  # the CLI: one line, exit 2
    (ckpt / OPT_JSON).unlink()
    (ckpt / OPT).unlink()
    with pytest.raises(CheckpointError, match="optimizer.safetensors: missing"):
        load_optimizer_state(ckpt)


def test_latest_good_checkpoint_skips_bad_newer_ones(interrupted, tmp_path):
    root = _copy_run(interrupted, tmp_path)
    assert latest_good_checkpoint(root) == (root / "step-000003", [])
    _truncate(root / "step-000003" / OPT)
    _poke(root / "step-000002" / ADAPTER, "lora_A", 1e30)
    good, rejected = latest_good_checkpoint(root)
    assert good == root / "step-000001"
    assert [(p.name, len(problems)) for p, problems in rejected] == [("step-000003", 1), ("step-000002", 1)]
    _break_json(root / "step-000001" / STATE_FILE)
    assert latest_good_checkpoint(root)[0] is None
    assert latest_good_checkpoint(tmp_path / "nothing") == (None, [])


# ---------------------------------------------------------------------------------------------
# Resume falls back to the newest checkpoint that verifies


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_resume_falls_back_past_a_bad_latest_checkpoint(interrupted, reference, tiny_model_dir, tmp_path, caplog, case):
    root = _copy_run(interrupted, tmp_path)
    damage, expected = CORRUPTIONS[case]
    damage(root / "step-000003")
    with caplog.at_level(logging.WARNING, logger="qlora_kit"):
        result = train(_config(tmp_path, tiny_model_dir), resume=True, progress=False)
    rejected = [m for m in caplog.messages if m.startswith(f"checkpoint {root / 'step-000003'} rejected: ")]
    assert len(rejected) == 1 and re.search(expected, rejected[0]), caplog.messages
    assert f"resuming from {root / 'step-000002'}, the newest checkpoint that verifies" in caplog.messages
    assert result.status == "completed" and result.steps == 4
    assert (result.adapter_dir / ADAPTER).read_bytes() == reference  # continued from step 2, not from the bad 3
    assert [p.name for p in list_checkpoints(root)] == ["step-000002", "step-000003", "step-000004"]
    assert all(verify_checkpoint(p) == [] for p in list_checkpoints(root))  # the bad step 3 was rewritten


def test_resume_stops_with_one_line_when_no_checkpoint_verifies(interrupted, tiny_model_dir, tmp_path, monkeypatch):
    import qlora_kit.training.setup as train_mod

    root = _copy_run(interrupted, tmp_path)
    for ckpt in list_checkpoints(root):
        _truncate(ckpt / ADAPTER)
    monkeypatch.setattr(train_mod, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(CheckpointError, match=r"no checkpoint verifies, so the run cannot be resumed \(newest, "
                                              r"step-000003: adapter_model\.safetensors: .*start over in a new "
                                              r"training\.output_dir") as e:
        train(_config(tmp_path, tiny_model_dir), resume=True, progress=False)
    assert "\n" not in str(e.value) and _is_user_error(e.value)


def _cli(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "qlora_kit", "train", str(config), "--resume"], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=300, check=False)


def test_cli_resume_falls_back_then_stops_cleanly_when_nothing_verifies(interrupted, reference, tiny_model_dir, tmp_path):
    root = _copy_run(interrupted, tmp_path)
    _config(tmp_path, tiny_model_dir)
    _poke(root / "step-000003" / ADAPTER, "lora_B", 1e30)
    done = _cli(tmp_path / "config.yaml", tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert (f"checkpoint {root / 'step-000003'} rejected: adapter_model.safetensors: sha256 differs from the "
            "manifest (changed or corrupted after it was written)") in done.stderr.splitlines()
    assert (tmp_path / "run" / "adapter" / ADAPTER).read_bytes() == reference

    for ckpt in list_checkpoints(root):  # now every checkpoint is bad: exit 2, one line, no traceback
        (ckpt / OPT_JSON).unlink()
    failed = _cli(tmp_path / "config.yaml", tmp_path)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no checkpoint verifies" in errors[0] and "optimizer.json: missing" in errors[0]
    assert failed.stderr.rstrip().endswith(errors[0])  # the last thing printed, on a line of its own


# ---------------------------------------------------------------------------------------------
# Rotation


def test_rotation_keeps_the_new_checkpoint_and_drops_abandoned_newer_ones(tiny_model_dir, tmp_path):
    from conftest import load_tiny

    from qlora_kit import LoraConfig, add_lora

    model, _ = load_tiny(tiny_model_dir)
    add_lora(model, LoraConfig(r=4))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        save_checkpoint(root, step, model, optimizer, {}, keep=3)
    assert [p.name for p in list_checkpoints(root)] == ["step-000002", "step-000004", "step-000006"]
    _truncate(root / "step-000006" / OPT)
    assert latest_good_checkpoint(root)[0] == root / "step-000004"  # a resume would continue from step 4 ...
    save_checkpoint(root, 5, model, optimizer, {}, keep=2)  # ... and save step 5 next
    assert [p.name for p in list_checkpoints(root)] == ["step-000004", "step-000005"]  # 6 is gone, 5 and 4 kept
    assert latest_good_checkpoint(root) == (root / "step-000005", [])
    save_checkpoint(root, 7, model, optimizer, {}, keep=1)
    assert [p.name for p in root.iterdir()] == ["step-000007"]  # no temp or trash folder left either
