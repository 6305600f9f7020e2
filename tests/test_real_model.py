"""On the real SmolLM2-135M-Instruct demo model (run with `bash scripts/test.sh -m real_model`)."""
import pytest

pytestmark = pytest.mark.real_model


def test_demo_model_loads_in_4bit_at_the_planned_footprint_and_answers(demo_model_dir):
    import json

    from qlora_kit import load_model
    from qlora_kit.inference.generate import generate
    from qlora_kit.model.load import footprint

    model, tokenizer = load_model(demo_model_dir)
    fp = footprint(model)
    cfg = json.loads((demo_model_dir / "config.json").read_text())
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * cfg.get("head_dim", h // cfg["num_attention_heads"])
    quantized = layers * (2 * h * h + 2 * h * kv + 3 * h * i)  # q, o, k, v, gate, up, down
    unquantized = cfg["vocab_size"] * h + (2 * layers + 1) * h  # tied embeddings/head, norms
    planned = 0.516 * quantized + unquantized * model.model.embed_tokens.weight.element_size()
    assert fp["quantized_params"] == quantized
    assert fp["bytes"] == pytest.approx(planned, rel=0.05)
    answer = generate(model, tokenizer, ["What is the capital of France?"], max_new_tokens=12)[0]
    assert "Paris" in answer


def test_dpo_reference_is_the_policy_at_step_0_in_the_models_compute_dtype(demo_model_dir, tmp_path):
    """bf16 on CPUs with native bf16 (the dtype auto picks): the frozen starting adapter as reference, and the base
    as reference under a fresh adapter, both give loss ln 2 and rewards 0 exactly; the cached reference, one pair
    per forward, equals the live one. (Before the reference took the training attention kernel: 0.7027.)"""
    import math

    import torch

    from qlora_kit import LoraConfig, add_lora, load_model, save_adapter
    from qlora_kit.config import DataConfig, TrainConfig
    from qlora_kit.data.batching import collate_pairs
    from qlora_kit.data.prepare import prepare_data
    from qlora_kit.model.lora import lora_layers
    from qlora_kit.training.objectives import StepTotals, preference_loss, reference_logps
    from qlora_kit.training.reference_cache import ReferenceLogps, attach, compute
    from qlora_kit.training.start_adapter import load_start_weights, start_config

    words = ["apple", "river", "stone", "cloud"]
    records = [{"prompt": f"Write the word {w} in capital letters.", "chosen": w.upper(),
                "rejected": f"Sure! Here it is: {w}"} for w in words]
    model, tok = load_model(demo_model_dir)
    torch.manual_seed(0)
    add_lora(model, LoraConfig(r=8, alpha=16))
    model.train()
    pairs, _, _ = prepare_data(DataConfig(max_seq_len=128), tok, records=records)
    batch = collate_pairs(pairs, tok.pad_token_id, 128)
    config = TrainConfig()
    config.model.path, config.training.objective, config.data.max_seq_len = str(demo_model_dir), "dpo", 128
    loss, stats = preference_loss(model, batch, config.training, StepTotals.of([batch]))  # B = 0: the base
    assert abs(loss.item() - math.log(2)) < 1e-7
    assert stats.reward_chosen == 0.0 and stats.reward_rejected == 0.0
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.adapters["default"].lora_B.normal_(0, 0.002)
    config.model.adapter = str(save_adapter(model, tmp_path / "sft"))
    del model
    config = start_config(config, None)
    model, _ = load_model(demo_model_dir)
    add_lora(model, config.lora)
    load_start_weights(model, config)
    model.train()
    loss, stats = preference_loss(model, batch, config.training, StepTotals.of([batch]))
    assert abs(loss.item() - math.log(2)) < 1e-7 and stats.reward_chosen == 0.0
    config.training.batch_size = 1
    cached = ReferenceLogps(compute(model, pairs, config, tok.pad_token_id, "test"), torch.empty(0, 2))
    rows = attach([batch], [list(range(len(pairs)))], cached, "train")[0]["reference_logps"]
    assert torch.equal(rows, reference_logps(model, batch, as_training=True))
