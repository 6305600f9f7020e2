"""The optimized paths against the unoptimized ones: fused LoRA (fused.py) and the generation weight cache."""
import bitsandbytes as bnb
import pytest
import torch
from conftest import load_tiny
from torch import nn

from qlora_kit import LoraConfig
from qlora_kit.model.fused import dense_cache_bytes, dequantized_weights, set_fused
from qlora_kit.model.lora import LoraLinear


@pytest.fixture
def unfused():
    """Run the block's code with the fused path off, then restore it."""
    set_fused(False)
    yield
    set_fused(True)


def _layer(in_f, out_f, compute_dtype, bias=False, seed=0, r=8, alpha=16, rank=None):
    torch.manual_seed(seed)
    base = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=compute_dtype, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(out_f, in_f) * 0.05, requires_grad=False, quant_type="nf4",
                                    compress_statistics=True)
    if bias:
        base.bias = nn.Parameter(torch.randn(out_f) * 0.1, requires_grad=False)
    base = base.to("cpu")
    layer = LoraLinear(base)
    ad = layer.add("default", LoraConfig(r=r, alpha=alpha))
    layer.active = ["default"]
    with torch.no_grad():
        ad.lora_B.normal_(std=0.05)
    if rank:
        ad.rank = rank
    return layer


def _run(layer, x, g):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(g)
    ad = layer.adapters["default"]
    return y.detach(), x.grad, ad.lora_A.grad, ad.lora_B.grad


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rank", [None, 5])
def test_fused_matches_unfused_fp32(bias, rank):
    layer = _layer(128, 96, torch.float32, bias=bias, rank=rank)
    torch.manual_seed(1)
    x, g = torch.randn(3, 7, 128), torch.randn(3, 7, 96)
    fused = _run(layer, x, g)
    set_fused(False)
    try:
        ref = _run(layer, x, g)
    finally:
        set_fused(True)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_fused_matches_unfused_bf16():
    """bf16 compute: the base output is the same bnb dequantization; the adapter runs in bf16 (close, not equal)."""
    layer = _layer(256, 192, torch.bfloat16)
    torch.manual_seed(1)
    x, g = torch.randn(4, 9, 256, dtype=torch.bfloat16), torch.randn(4, 9, 192, dtype=torch.bfloat16)
    fused = _run(layer, x, g)
    set_fused(False)
    try:
        ref = _run(layer, x, g)
    finally:
        set_fused(True)
    assert fused[0].dtype == ref[0].dtype == torch.bfloat16
    assert fused[2].dtype == torch.float32  # grads land in the parameters' dtype
    for a, b in zip(fused, ref):
        rel = (a.float() - b.float()).norm() / b.float().norm()
        assert rel < 1e-2, rel


def test_fused_base_output_is_bitwise_bnb_with_zero_B():
    layer = _layer(128, 64, torch.bfloat16)
    with torch.no_grad():
        layer.adapters["default"].lora_B.zero_()
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base(x))


def test_fused_is_skipped_for_dropout_and_several_adapters():
    from qlora_kit.model.fused import try_fused_forward

    layer = _layer(64, 32, torch.float32)
    x = torch.randn(2, 64)
    assert try_fused_forward(layer, x) is not None
    layer.add("other", LoraConfig(r=4))
    layer.active = ["default", "other"]
    assert try_fused_forward(layer, x) is None
    drop = _layer(64, 32, torch.float32)
    drop.adapters["default"].dropout = nn.Dropout(0.1)
    assert try_fused_forward(drop.train(), x) is None
    assert try_fused_forward(drop.eval(), x) is not None


def _tiny_with_lora(model_dir, b_std: float):
    """The tiny 4-bit model with an r=8 adapter whose B is random (so the adapter changes the output)."""
    from qlora_kit import add_lora

    model, tok = load_tiny(model_dir)
    torch.manual_seed(0)
    add_lora(model, LoraConfig(r=8, alpha=16))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=b_std)
    return model, tok


def test_tiny_model_loss_and_grads_fused_vs_unfused(tiny_model_dir):
    from qlora_kit.training.loss import causal_lm_loss

    model, tok = _tiny_with_lora(tiny_model_dir, b_std=0.02)
    ids = torch.randint(0, 100, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "labels": labels}

    def grads():
        model.zero_grad(set_to_none=True)
        loss, n = causal_lm_loss(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    l1, g1 = grads()
    set_fused(False)
    try:
        l2, g2 = grads()
    finally:
        set_fused(True)
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], atol=1e-5, rtol=1e-4)


def test_dequantized_cache_greedy_identical_and_released(tiny_model_dir):
    from qlora_kit.inference.generate import generate

    model, tok = _tiny_with_lora(tiny_model_dir, b_std=0.05)
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        ref_logits = model(input_ids=ids).logits
        with dequantized_weights(model):
            cached_logits = model(input_ids=ids).logits
            set_fused(False)
            try:
                unfused_cached = model(input_ids=ids).logits
            finally:
                set_fused(True)
    torch.testing.assert_close(cached_logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unfused_cached, ref_logits, atol=1e-5, rtol=1e-5)
    assert not any(hasattr(m, "_qlora_dense") for m in model.modules())  # released
    assert dense_cache_bytes(model) > 0
    prompts = ["hello there", "a b c d"]
    fast = generate(model, tok, prompts, max_new_tokens=8, chat=False)
    slow = generate(model, tok, prompts, max_new_tokens=8, chat=False, dequantize_once=False)
    assert fast == slow
    with pytest.raises(RuntimeError, match="inference-only"):
        with dequantized_weights(model):
            pass


def test_evaluate_then_train_leaves_no_cpu_packed_weight(tiny_model_dir):
    """FACTS.md: bnb's Linear4bit repacks its weight in place for a bf16 CPU kernel in eval mode without grad
    (on AVX512-BF16 CPUs) and never unpacks it. Evaluating (with and without the adapter) must not do that,
    and a training step afterwards must change the loss."""
    from qlora_kit import LoraConfig, add_lora
    from qlora_kit.model.lora import adapters_disabled
    from qlora_kit.training.loss import causal_lm_loss

    model, _ = load_tiny(tiny_model_dir, compute_dtype="bf16")
    add_lora(model, LoraConfig(r=8, alpha=16))
    ids = torch.randint(0, 100, (2, 12))
    batch = {"input_ids": ids, "labels": ids.clone()}
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
        with adapters_disabled(model):
            model(input_ids=ids)
    packed = [n for n, m in model.named_modules()
              if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]
    assert packed == []
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(3):
        loss, n = causal_lm_loss(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item() / n)
    assert losses[-1] < losses[0]
