import pytest

from qlora_kit.config import ConfigError, LoraConfig, QuantConfig, apply_overrides, from_dict


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

    from qlora_kit.config import load_train_config

    cfg = load_train_config(Path(__file__).parent.parent / "docs" / "config.example.yaml")
    assert cfg.model.path == "demo" and cfg.lora.target_modules == "all-linear" and cfg.training.eval_every == 50
