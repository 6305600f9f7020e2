"""The public API runs the whole workflow from ``import qlora_kit``: a YAML file or a dataclass config in,
a trained adapter out, then generation and a merge through the same namespace."""
import json

import yaml

import qlora_kit


def _toy(tmp_path, n=24):
    rows = [{"instruction": f"Repeat {w}.", "input": "", "output": w} for w in ["red", "blue", "green"] * (n // 3)]
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_public_api_trains_generates_and_merges(tmp_path, tiny_model_dir):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_model_dir), "compute_dtype": "fp32", "device": "cpu"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"train_file": str(_toy(tmp_path)), "max_seq_len": 64},
        "training": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "max_steps": 3, "optimizer": "adamw",
                     "gradient_checkpointing": "off"},
    }))
    result = qlora_kit.train(config_file, "training.lr=1e-3", progress=False)
    assert result.status == "completed" and result.steps == 3
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()

    config = qlora_kit.load_train_config(config_file, [f"training.output_dir={tmp_path / 'run2'}"])
    assert isinstance(config, qlora_kit.TrainConfig) and config.training.lr == 2e-4
    again = qlora_kit.train(config, progress=False)  # a dataclass config trains the same way
    assert again.steps == 3 and again.output_dir == tmp_path / "run2"

    model, tokenizer = qlora_kit.load_model(tiny_model_dir, compute_dtype="fp32", device="cpu")
    qlora_kit.load_adapter(model, result.adapter_dir)
    texts = qlora_kit.generate(model, tokenizer, ["Repeat red."], max_new_tokens=3)
    assert len(texts) == 1 and isinstance(texts[0], str)

    merged = qlora_kit.merge_and_export(tiny_model_dir, result.adapter_dir, tmp_path / "merged", verify=False, progress=False)
    assert (tmp_path / "merged" / "config.json").is_file() and merged["modules_merged"] > 0


def test_the_public_api_names_the_whole_workflow():
    for name in ("load_model", "add_lora", "train", "load_train_config", "TrainConfig", "generate", "save_adapter",
                 "load_adapter", "merge_and_export", "plan_memory"):
        assert name in qlora_kit.__all__ and callable(getattr(qlora_kit, name))
