import dataclasses
import re
import typing

import pytest

from qlora_kit.config import (
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    QuantConfig,
    TrainConfig,
    TrainingConfig,
    apply_overrides,
    from_dict,
    load_train_config,
)


def test_unknown_key_names_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'alpha'"):
        from_dict(LoraConfig, {"alpah": 8}, "lora")


@pytest.mark.parametrize("data, msg", [({"r": -1}, "lora.r"), ({"dropout": 1.0}, "lora.dropout"),
                                       ({"r": "eight"}, "integer"), ({"init": "xavier"}, "lora.init")])
def test_invalid_values_name_the_field(data, msg):
    with pytest.raises(ConfigError, match=msg):
        from_dict(LoraConfig, data, "lora")


def test_overrides_and_types():
    data = apply_overrides({"lora": {"r": 8}}, ["lora.r=4", "lora.target_modules=[q_proj, v_proj]"])
    cfg = from_dict(LoraConfig, data["lora"], "lora")
    assert cfg.r == 4 and cfg.target_modules == ["q_proj", "v_proj"]
    assert from_dict(QuantConfig, {"quant_type": "fp4"}, "quant").quant_type == "fp4"
    with pytest.raises(ConfigError, match="quant.quant_type"):
        from_dict(QuantConfig, {"quant_type": "int4"}, "quant")


def test_example_config_in_docs_parses():
    from pathlib import Path

    cfg = load_train_config(Path(__file__).parent.parent / "docs" / "config.example.yaml")
    assert cfg.model.path == "demo" and cfg.lora.target_modules == "all-linear" and cfg.training.eval_every == 50


# ---------------------------------------------------------------------------------------------
# Issue 14 section 4 (config) and issue 18 ("did you mean" in the user's vocabulary)

BASE = "model:\n  path: m\ndata:\n  train_file: d.jsonl\n"
SECTIONS = {"model": ModelConfig, "quant": QuantConfig, "lora": LoraConfig, "data": DataConfig,
            "training": TrainingConfig}


def _write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_a_key_set_twice_names_the_file_and_both_lines(tmp_path):
    path = _write(tmp_path, BASE + "training:\n  lr: 1.0e-4\n  batch_size: 2\n  lr: 3.0e-4\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml line 8: training\.lr is set twice \(lines 6 and 8\); keep one"):
        load_train_config(path)


def test_a_section_given_twice_names_both_lines(tmp_path):
    path = _write(tmp_path, BASE + "lora:\n  r: 8\ntraining:\n  lr: 1.0e-4\nlora:\n  alpha: 4\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml line 9: section lora appears twice \(lines 5 and 9\)"):
        load_train_config(path)


def test_a_yaml_merge_key_may_still_be_overridden(tmp_path):
    cfg = load_train_config(_write(tmp_path, BASE + "lora:\n  <<: {r: 8, alpha: 4.0}\n  r: 4\n"))
    assert cfg.lora.r == 4 and cfg.lora.alpha == 4.0  # YAML's explicit override of a merged key is not a duplicate


@pytest.mark.parametrize("key, value, interval", [
    ("save_every", -1, r"\[0, 1_000_000_000\]"), ("max_steps", -5, r"\[0, 1_000_000_000\]"),
    ("warmup_steps", -3, r"\[0, 1_000_000_000\]"), ("max_grad_norm", -1.0, r"\[0, inf\)"),
    ("early_stopping_patience", -2, r"\[0, 1_000_000_000\]"), ("warmup_ratio", 1.5, r"\[0, 1\]"),
    ("eval_every", -1, r"\[0, 1_000_000_000\]"), ("weight_decay", -0.01, r"\[0, inf\)"),
    ("seed", -7, r"\[0, 4_294_967_295\]"),
])
def test_out_of_range_values_name_the_line_the_key_and_the_range(tmp_path, key, value, interval):
    path = _write(tmp_path, BASE + f"training:\n  output_dir: runs/x\n  {key}: {value}\n")
    with pytest.raises(ConfigError, match=rf"cfg\.yaml line 7: training\.{key}: must be in {interval}, got {value}"):
        load_train_config(path)


def _numeric_fields():
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if re.search(r"\b(int|float)\b", str(hints[f.name])):
                yield section, f


def test_every_numeric_field_declares_a_range_and_validate_enforces_its_bounds():
    fields = list(_numeric_fields())
    assert len(fields) >= 25  # every int/float field of every section, layers' elements included
    for section, f in fields:
        interval = f.metadata.get("range")
        assert interval, f"{section}.{f.name} declares no range"
        left, low, high, right = re.match(r"^([\[(])(\S+), (\S+)([\])])$", interval).groups()
        is_int = "int" in str(typing.get_type_hints(SECTIONS[section])[f.name])
        num = int if is_int else float
        step = 1 if is_int else 1e-9 * max(1.0, abs(float(low)))
        cases = [(float(low) - step if left == "[" else float(low), False)]
        cases += [(float(high) + (1 if is_int else 1e-9 * abs(float(high))) if right == "]" else float(high), False)]
        cases += [(float(low), True)] if left == "[" else []
        cases += [(float(high), True)] if right == "]" and high != "inf" else []
        for value, ok in cases:
            value = [num(value)] if f.name == "layers" else num(value) if value not in (float("inf"),) else value
            cfg = TrainConfig(model=ModelConfig(path="m"), data=DataConfig(train_file="d"))
            sect = dataclasses.replace(getattr(cfg, section), **{f.name: value})
            if f.name in ("r_min", "active_rank"):
                sect.r = 65_536  # both are also checked against r
            setattr(cfg, section, sect)
            if section == "training" and f.name == "epochs":
                cfg.training.max_steps = 1
            if ok and not (section == "quant" and f.name == "bits" and value not in (4, 8, 16)):
                cfg.validate()
            elif not ok:
                with pytest.raises(ConfigError, match=rf"{section}\.{f.name}: must be in "):
                    cfg.validate()


@pytest.mark.parametrize("text", [
    "lora:\n  r: 99999999999999999999999\n", "training:\n  max_steps: 123456789012345678901234567890\n",
    "training:\n  seed: " + "9" * 5000 + "\n", "training:\n  loss_chunk_size: " + "7" * 40 + "\n",
    "lora:\n  layers: [0, " + "1" * 30 + "]\n",
])
def test_an_integer_too_large_for_its_field_is_a_config_error(tmp_path, text):
    with pytest.raises(ConfigError, match=r"cfg\.yaml line \d+: .*(must be in|too large|number)"):
        load_train_config(_write(tmp_path, BASE + text))


def test_a_huge_integer_in_an_override_is_a_config_error():
    with pytest.raises(ConfigError, match=r"override 'training\.seed=9+': .*5000 characters is too large"):
        load_train_config(None, ["model.path=m", "data.train_file=d", "training.seed=" + "9" * 5000])


def test_huge_integers_from_python_are_config_errors_not_overflow():
    for section in (LoraConfig(r=10**5000), LoraConfig(alpha=10**400), TrainingConfig(max_steps=10**30)):
        with pytest.raises(ConfigError, match="must be in"):
            section.validate()


@pytest.mark.parametrize("section, message", [
    (ModelConfig(path="m", compute_dtype="bf17"), r"model\.compute_dtype: 'bf17'"),
    (DataConfig(train_file="d", format="xml"), r"data\.format: 'xml'"),
    (DataConfig(train_file="d", max_seq_len=2), r"data\.max_seq_len: must be in \[8, "),
    (TrainingConfig(save_every=-1), r"training\.save_every: must be in \[0, "),
    (TrainingConfig(lr="1e-4"), r"training\.lr: expected a number, got '1e-4'"),
    (TrainingConfig(optimizer="sgd"), r"training\.optimizer: 'sgd' is unknown"),
])
def test_a_config_built_in_python_gets_every_sections_checks(section, message):
    cfg = TrainConfig(model=ModelConfig(path="m"), data=DataConfig(train_file="d"))
    setattr(cfg, {ModelConfig: "model", DataConfig: "data", TrainingConfig: "training"}[type(section)], section)
    if isinstance(section, ModelConfig | DataConfig):
        section.path = getattr(section, "path", "m") or "m"
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_train_on_a_python_built_config_checks_the_training_section_first(tmp_path):
    from qlora_kit.training.recipe import train

    cfg = TrainConfig(model=ModelConfig(path=str(tmp_path / "no-model")), data=DataConfig(train_file="d.jsonl"),
                      training=TrainingConfig(output_dir=str(tmp_path / "run"), max_steps=-1))
    with pytest.raises(ConfigError, match=r"training\.max_steps: must be in \[0, "):
        train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("written, meant", [
    ("lora.rank", "lora.r"), ("lora.lora_r", "lora.r"), ("training.learning_rate", "training.lr"),
    ("training.num_train_epochs", "training.epochs"), ("training.per_device_train_batch_size", "training.batch_size"),
    ("training.gradient_accumulation_steps", "training.grad_accum"), ("lora.lora_alpha", "lora.alpha"),
    ("lora.lora_dropout", "lora.dropout"), ("lora_target_modules", "lora.target_modules"),
    ("training.target_modules", "lora.target_modules"), ("sequence_len", "data.max_seq_len"),
    ("training.max_seq_length", "data.max_seq_len"), ("training.lr_scheduler_type", "training.scheduler"),
    ("optim", "training.optimizer"), ("training.save_steps", "training.save_every"),
    ("training.eval_steps", "training.eval_every"), ("training.logging_steps", "training.log_every"),
    ("base_model", "model.path"), ("model.model_name_or_path", "model.path"), ("micro_batch_size", "training.batch_size"),
    ("num_epochs", "training.epochs"), ("val_set_size", "data.eval_fraction"), ("load_in_4bit", "quant.bits: 4"),
    ("bnb_4bit_quant_type", "quant.quant_type"), ("quant.bnb_4bit_use_double_quant", "quant.double_quant"),
    ("bnb_4bit_compute_dtype", "model.compute_dtype"), ("bf16", "model.compute_dtype: bf16"),
    ("lr", "training.lr"), ("warmup_steps", "training.warmup_steps"), ("output_dir", "training.output_dir"),
    ("seed", "training.seed"), ("max_grad_norm", "training.max_grad_norm"), ("weight_decay", "training.weight_decay"),
    ("gradient_checkpointing", "training.gradient_checkpointing"), ("r", "lora.r"),
])
def test_names_from_other_tools_suggest_our_key(written, meant):
    with pytest.raises(ConfigError, match=rf"unknown config key '{re.escape(written)}'; did you mean "
                                          rf"'{re.escape(meant)}'\?"):
        load_train_config(None, ["model.path=m", "data.train_file=d", f"{written}=1"])


def test_every_alias_points_at_a_real_key():
    from qlora_kit.config_aliases import ALIASES

    for name, target in ALIASES.items():
        section, key = target.split(":")[0].split(".")
        assert key in {f.name for f in dataclasses.fields(SECTIONS[section])}, (name, target)


def test_every_unknown_key_of_a_file_is_reported_at_once_with_its_line(tmp_path):
    path = _write(tmp_path, BASE + "lora:\n  rank: 8\n  alpah: 4\ntraining:\n  learning_rate: 1.0e-4\n"
                                   "sequence_len: 512\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}: 4 unknown config keys (rename or remove each):"
    assert lines[1:] == ["  line 6: 'lora.rank': did you mean 'lora.r'?", "  line 7: 'lora.alpah': did you mean 'alpha'?",
                         "  line 9: 'training.learning_rate': did you mean 'training.lr'?",
                         "  line 10: 'sequence_len': did you mean 'data.max_seq_len'?"]


def test_cli_validate_on_a_duplicate_key_exits_2_with_the_lines(tmp_path, capsys):
    from qlora_kit.cli import main

    path = _write(tmp_path, BASE + "training:\n  save_every: 5\n  save_every: 10\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {path} line 7: training.save_every is set twice (lines 6 and 7); keep one"
