"""on_nonfinite: stop names a checkpoint that is really good; rollback restores one and goes on, a bounded number of times."""
import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_kit.config import load_train_config
from qlora_kit.training.recipe import train
from qlora_kit.training.run import RunDiverged, TrainingError

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "robot"]


def _config(folder, model_dir, **training):
    """16 examples, batch 4, a checkpoint every step; one loss call per step (no validation set)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Spell {w}.", "output": w.upper()}) + "\n" for w in WORDS * 2))
    settings = {"max_steps": 9, "save_every": 1, "keep_checkpoints": 10, "batch_size": 4, "optimizer": "adamw",
                "lr": 5e-3, "gradient_checkpointing": "off", **training}
    overrides = [f"model.path={model_dir}", f"data.train_file={data}", "data.max_seq_len=64", "model.compute_dtype=fp32",
                 "model.device=cpu", "lora.r=4", "lora.alpha=8", f"training.output_dir={folder / 'run'}"]
    return load_train_config(None, overrides + [f"training.{k}={v}" for k, v in settings.items()])


def _poison_loss(monkeypatch, factor, steps, before=None):
    """Multiply the loss of the given steps by ``factor``; call ``before(step)`` first at the first of them."""
    import qlora_kit.training.step as train_mod

    real, calls = train_mod.causal_lm_loss, {"n": 0}

    def poisoned(model, batch, chunk):
        calls["n"] += 1
        loss, n = real(model, batch, chunk)
        if calls["n"] in steps:
            if before is not None and calls["n"] == min(steps):
                before(calls["n"])
            return loss * factor, n
        return loss, n

    monkeypatch.setattr(train_mod, "causal_lm_loss", poisoned)


def _plant_nan(ckpt):
    path = ckpt / "adapter_model.safetensors"
    tensors = load_file(str(path))
    name = next(k for k in tensors if "lora_B" in k)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(path))


def test_the_last_good_checkpoint_is_never_one_with_a_nan_planted_in_it(tiny_model_dir, tmp_path, monkeypatch):
    root = tmp_path / "run" / "checkpoints"
    _poison_loss(monkeypatch, float("nan"), {7}, before=lambda step: _plant_nan(root / "step-000006"))
    with pytest.raises(TrainingError, match=r"step 7: loss nan.* is not finite; stopped\. The last good checkpoint is "
                                            r"\S*step-000005 \(step-000006 failed verification") as e:
        train(_config(tmp_path, tiny_model_dir), progress=False)
    assert "\n" not in str(e.value)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "diverged"


def test_a_loss_spike_rolls_back_to_the_last_good_checkpoint_and_goes_on(tiny_model_dir, tmp_path, monkeypatch, caplog):
    _poison_loss(monkeypatch, 1000.0, {7})
    with caplog.at_level(logging.WARNING, logger="qlora_kit"):
        result = train(_config(tmp_path, tiny_model_dir, on_nonfinite="rollback"), progress=False)
    assert result.status == "completed" and result.steps == 9
    warning = next(r.message for r in caplog.records if "rolled back" in r.message)
    assert warning.startswith("step 7: loss") and "spike" in warning and "step-000005" in warning
    root = tmp_path / "run" / "checkpoints"
    # the checkpoint written right after the rollback holds exactly the restored state of step 5
    assert (root / "step-000007" / "adapter_model.safetensors").read_bytes() == \
        (root / "step-000005" / "adapter_model.safetensors").read_bytes()
    assert (root / "step-000007" / "optimizer.safetensors").read_bytes() == \
        (root / "step-000005" / "optimizer.safetensors").read_bytes()
    state = json.loads((root / "step-000009" / "trainer_state.json").read_text())
    assert state["recovery"] == {"rollbacks": 1, "abandoned": [[5, 7]]}
    assert all(torch.isfinite(t).all() for t in load_file(str(result.adapter_dir / "adapter_model.safetensors")).values())


def test_rollbacks_are_bounded_then_the_run_stops(tiny_model_dir, tmp_path, monkeypatch):
    _poison_loss(monkeypatch, 1000.0, set(range(7, 20)))
    with pytest.raises(RunDiverged, match=r"step 10: .*spike.*stopped \(3 rollbacks already\)\. The last good "
                                          r"checkpoint is \S*step-000005"):
        train(_config(tmp_path, tiny_model_dir, on_nonfinite="rollback", max_steps=12), progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["adapter_dir"] is None


def test_skip_cannot_undo_dead_training_so_it_stops(tiny_model_dir, tmp_path):
    with pytest.raises(RunDiverged, match=r"step 5: gradient norm exactly 0 since step 3.*stopped \(skipping cannot "
                                          r"undo this\)"):
        train(_config(tmp_path, tiny_model_dir, on_nonfinite="skip", lr=1e3), progress=False)
