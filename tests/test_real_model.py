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
