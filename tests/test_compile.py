"""training.compile: compiled decoder layers give the eager loss and LoRA gradients; eager(); config checks."""
import pytest
import torch
from conftest import load_tiny

from qlora_kit import LoraConfig, add_lora
from qlora_kit.config import ConfigError, TrainConfig
from qlora_kit.model.compile import compiled_for_training, decoder_layers, eager
from qlora_kit.training.loss import causal_lm_loss


def _batch(seq: int, seed: int) -> dict:
    ids = torch.randint(3, 100, (2, seq), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def _loss_and_grads(model, batch) -> tuple[float, dict]:
    loss, n = causal_lm_loss(model, batch)
    (loss / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def test_compiled_layers_match_eager_across_batch_shapes(tiny_model_dir):
    """fp32: compiled and eager steps agree to 1e-5 on two sequence lengths (dynamic shapes, one compilation)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, _ = load_tiny(tiny_model_dir)
    add_lora(model, LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
    batches = [_batch(12, 0), _batch(17, 1)]
    reference = [_loss_and_grads(model, b) for b in batches]
    layers = decoder_layers(model)
    with compiled_for_training(model, True):
        assert [layer._compiled_call_impl is not None for layer in layers] == [False] + [True] * (len(layers) - 1)
        for b, (ref_loss, ref_grads) in zip(batches, reference, strict=True):
            loss, grads = _loss_and_grads(model, b)
            assert loss == pytest.approx(ref_loss, rel=1e-5)
            for name, g in grads.items():
                torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
        frames = torch._dynamo.utils.counters["frames"]
        assert frames["ok"] == frames["total"] == 1  # one graph for both lengths (the first layer stays eager)
        with eager():  # evaluation inside training: the original forward, no new compilation
            with torch.no_grad():
                model(input_ids=batches[0]["input_ids"])
            assert frames["total"] == 1
    assert all(layer._compiled_call_impl is None for layer in layers)  # handed back as it came
    torch._dynamo.reset()


def test_compile_on_with_dynamic_rank_is_a_config_error():
    cfg = TrainConfig()
    cfg.model.path, cfg.data.train_file = "m", "d.jsonl"
    cfg.training.compile, cfg.lora.dynamic_rank = "on", True
    with pytest.raises(ConfigError, match="training.compile"):
        cfg.validate()
    cfg.training.compile = "auto"
    with pytest.raises(ConfigError, match="use on or off"):
        cfg.validate()
