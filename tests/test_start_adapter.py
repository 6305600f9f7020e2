"""model.adapter (training/start_adapter.py): checked before the model loads, its LoRA settings taken, conflicts
refused; the frozen reference copy (model/reference.py); the planner's two rows per pair; rank-sweep's refusal
of preference data."""
import json
import shutil

import pytest
import torch
from conftest import load_tiny
from test_objectives import _preference_config

from qlora_kit.config import ConfigError, TrainConfig
from qlora_kit.model.lora import lora_layers, set_rank
from qlora_kit.model.reference import REFERENCE, freeze_reference, reference


def _no_model_load(monkeypatch):
    """Make any model load fail loudly: the checks under test must come before it."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the config error")
    monkeypatch.setattr("qlora_kit.model.load.load_model", refuse)
    monkeypatch.setattr("qlora_kit.training.setup.load_model", refuse)


def _train(config):
    from qlora_kit.training.recipe import train

    return train(config, progress=False)


def test_missing_or_bad_adapter_is_one_line_error_naming_the_field(tmp_path, tiny_model_dir, sft_adapter_dir,
                                                                   monkeypatch):
    _no_model_load(monkeypatch)
    config = _preference_config(tmp_path / "a", tiny_model_dir, "dpo", max_steps=1)
    config.model.adapter = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"^model\.adapter: .*nowhere.* is not a folder") as e:
        _train(config)
    assert "\n" not in str(e.value)
    broken = tmp_path / "broken"
    shutil.copytree(sft_adapter_dir, broken)
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,}')
    config.model.adapter = str(broken)
    with pytest.raises(ConfigError, match=r"^model\.adapter: .*adapter_config.json line 1: invalid JSON"):
        _train(config)
    cfg = json.loads((sft_adapter_dir / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(ConfigError, match=r'^model\.adapter: .*field "r" is 8 but the tensors have rank 4'):
        _train(config)


def test_lora_section_conflicting_with_the_adapter_is_an_error(tmp_path, tiny_model_dir, sft_adapter_dir, monkeypatch):
    _no_model_load(monkeypatch)
    config = _preference_config(tmp_path / "a", tiny_model_dir, "dpo", max_steps=1)
    config.model.adapter = str(sft_adapter_dir)
    config.lora.r = 8  # the adapter has r=4 (and _preference_config sets lora.r=4 explicitly: no conflict there)
    with pytest.raises(ConfigError, match=r"lora\.r=8 conflicts with model\.adapter \(r=4 .*set it to 4"):
        _train(config)
    config.lora.r, config.lora.target_modules = 4, ["q_proj", "k_proj"]
    with pytest.raises(ConfigError, match=r"lora\.target_modules=.*selects other layers than model\.adapter"):
        _train(config)


def test_reference_options_are_checked_against_objective_and_adapter():
    base = {"model": {"path": "m"}, "data": {"train_file": "t.jsonl"}}
    from qlora_kit.config import from_dict

    with pytest.raises(ConfigError, match="dpo_reference=adapter: needs model.adapter"):
        from_dict(TrainConfig, {**base, "training": {"objective": "dpo", "dpo_reference": "adapter"}})
    with pytest.raises(ConfigError, match="reference_logps=cache: only DPO has a reference"):
        from_dict(TrainConfig, {**base, "training": {"objective": "orpo", "reference_logps": "cache"}})
    with pytest.raises(ConfigError, match="dpo_reference: 'sft'; use auto, base, adapter"):
        from_dict(TrainConfig, {**base, "training": {"objective": "dpo", "dpo_reference": "sft"}})
    with pytest.raises(ConfigError, match="compile: on cannot compile objective=dpo"):
        from_dict(TrainConfig, {**base, "training": {"objective": "dpo", "compile": "on"}})
    auto = from_dict(TrainConfig, {**base, "training": {"objective": "dpo"}})
    assert auto.reference == "base"
    auto.model.adapter = "a"
    assert auto.reference == "adapter"


def test_validate_takes_the_adapters_lora_settings(tmp_path, tiny_model_dir, sft_adapter_dir):
    from qlora_kit.training.validate import validate_run

    config = _preference_config(tmp_path / "a", tiny_model_dir, "dpo", max_steps=1)
    config.model.adapter, config.lora.r, config.lora.alpha = str(sft_adapter_dir), 16, 32.0  # the defaults: taken
    checked = validate_run(config)
    assert checked.config.lora.r == 4 and checked.config.lora.alpha == 8.0
    assert sorted(checked.targets) == sorted(checked.config.lora.target_modules)
    assert {t.rsplit(".", 1)[-1] for t in checked.targets} == {"q_proj", "v_proj", "up_proj"}
    assert config.lora.r == 16  # the caller's config is not changed


def test_training_starts_from_the_adapter_and_saves_peft_format(tmp_path, tiny_model_dir, sft_adapter_dir):
    """SFT from model.adapter: the run starts at the adapter's weights (a negligible step leaves them), and the
    saved adapter keeps its modules and rank."""
    from safetensors.torch import load_file
    from test_train import _config  # the SFT recipe's tiny config

    config = _config(tmp_path, tiny_model_dir, max_steps=1)
    config.model.adapter = str(sft_adapter_dir)
    config.training.lr = 1e-12  # effectively no update: the output must be the starting adapter
    result = _train(config)
    start, out = load_file(sft_adapter_dir / "adapter_model.safetensors"), load_file(
        result.adapter_dir / "adapter_model.safetensors")
    assert start.keys() == out.keys()
    for key in start:
        torch.testing.assert_close(out[key], start[key], rtol=0, atol=1e-9)
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["r"] == 4 and sorted(saved["target_modules"]) == ["q_proj", "up_proj", "v_proj"]


def test_frozen_reference_is_buffers_and_survives_training_changes(tiny_model_dir, sft_adapter_dir):
    from qlora_kit.model.adapters import adapter_state, load_adapter

    model, _ = load_tiny(tiny_model_dir)
    load_adapter(model, sft_adapter_dir)  # trainable LoRA tensors, frozen base
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    before_keys = set(model.state_dict())
    assert freeze_reference(model) == 6
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n_params  # nothing new to train
    assert set(model.state_dict()) == before_keys  # non-persistent: in no state dict, no adapter file
    assert set(adapter_state(model)) == set(adapter_state(model, "default"))
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        start = model(input_ids=x).logits
        for _, layer in lora_layers(model):  # the policy moves away from the start
            layer.adapters["default"].lora_B.add_(0.1)
        set_rank(model, 2)  # a dynamic-rank step changes the trainable adapter's rank only
        moved = model(input_ids=x).logits
        with reference(model):
            ref = model(input_ids=x).logits
    assert not torch.allclose(moved, start)
    assert torch.equal(ref, start)
    assert all(layer.adapters[REFERENCE].rank == 4 for _, layer in lora_layers(model))


def test_planned_activations_of_dpo_are_twice_sft(tmp_path, tiny_model_dir):
    """A dpo/orpo micro-batch is 2 x batch_size rows of the pair's longer side: twice SFT's activations."""
    from qlora_kit.planning.fit import plan_run

    plans = {}
    for objective in ("sft", "dpo", "orpo"):
        config = TrainConfig()
        config.training.objective, config.training.batch_size = objective, 4
        plans[objective] = plan_run(config, tiny_model_dir, 64, torch.device("cpu"), grad_checkpointing=False)

    def activations(plan):
        return next(r.bytes for r in plan.rows if r.item.startswith("activations"))

    assert activations(plans["dpo"]) == pytest.approx(2 * activations(plans["sft"]), rel=1e-9)
    assert activations(plans["orpo"]) == activations(plans["dpo"])
    assert plans["dpo"].total > plans["sft"].total


def test_validate_plans_pairs_as_two_rows_of_the_longer_side(tmp_path, tiny_model_dir, monkeypatch):
    """validate_run asks the planner for the longest single side (not both sides as one sequence)."""
    from qlora_kit.training import validate

    seen = {}
    monkeypatch.setattr(validate, "check_fits", lambda config, path, seq_len, *a, **k: seen.update(seq=seq_len))
    checked = validate.validate_run(_preference_config(tmp_path / "a", tiny_model_dir, "dpo", max_steps=1))
    longest_side = max(max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in checked.train_set)
    assert seen["seq"] == longest_side


def test_rank_sweep_refuses_preference_data_before_loading(tmp_path, tiny_model_dir, sft_adapter_dir, monkeypatch,
                                                           capsys):
    from qlora_kit.cli import main

    _no_model_load(monkeypatch)
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps({"prompt": "Spell dog.", "chosen": "DOG", "rejected": "dog"}) + "\n")
    code = main(["rank-sweep", "--adapter", str(sft_adapter_dir), "--data", str(data), "--model", str(tiny_model_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "preference records" in err[0] and "no preference metric" in err[0]


def test_resume_with_another_starting_adapter_is_refused(tmp_path, tiny_model_dir, sft_adapter_dir, monkeypatch):
    """A checkpoint records the starting adapter's digest: resuming from changed files (another reference) is an
    error, not a silently different run."""
    from safetensors.torch import load_file, save_file
    from test_train import _interrupt_at

    from qlora_kit.training.recipe import train
    from qlora_kit.training.run import TrainingError

    adapter = tmp_path / "adapter"
    shutil.copytree(sft_adapter_dir, adapter)

    def config():
        c = _preference_config(tmp_path, tiny_model_dir, "dpo", max_steps=4, save_every=1)
        c.model.adapter = str(adapter)
        return c

    with monkeypatch.context() as m:
        _interrupt_at(m, 1)
        assert train(config(), progress=False).status == "interrupted"
    weights = {k: v * 1.5 for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    save_file(weights, adapter / "adapter_model.safetensors")
    with pytest.raises(TrainingError, match="started from another model.adapter"):
        train(config(), resume=True, progress=False)


def test_plan_command_counts_pairs_as_two_sequences(capsys):
    from qlora_kit.cli import main

    tables = {}
    for objective in ("sft", "dpo"):
        main(["plan", "--model", "llama-3.1-8b", "--seq-len", "512", "--batch", "4", "--device", "cpu",
              "--grad-checkpointing", "off", "--objective", objective])
        tables[objective] = capsys.readouterr().out
    main(["plan", "--model", "llama-3.1-8b", "--seq-len", "512", "--batch", "8", "--device", "cpu",
          "--grad-checkpointing", "off"])
    assert tables["dpo"] == capsys.readouterr().out  # 4 pairs plan as 8 sequences
    assert tables["dpo"] != tables["sft"]
