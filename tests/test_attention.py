"""The short-sequence attention path (model/attention.py) against torch's SDPA, the unoptimized path."""
import pytest
import torch
import torch.nn.functional as F
from conftest import load_tiny

from qlora_kit.model.attention import NAME, set_short_attention, short_attention, short_attention_forward


def _qkv(b, h, kv, s, d, dtype, seed=0):
    torch.manual_seed(seed)
    return [torch.randn(b, n, s, d, dtype=dtype, requires_grad=True) for n in (h, kv, kv)]


def _grads(fn, q, k, v, g):
    for t in (q, k, v):
        t.grad = None
    o = fn(q, k, v)
    o.backward(g)
    return [o.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]


def _masks(b, s):
    """Causal, causal with right padding on one row, and a packed block-diagonal mask: ``[b, 1, s, s]`` bools."""
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    padded = causal.expand(b, 1, s, s).clone()
    padded[b - 1, :, :, s - 3:] = False  # the last 3 keys of the last row are padding
    packed = causal.clone()
    packed[s // 2:, : s // 2] = False  # two examples in one row
    return {"causal": causal[None, None], "padded": padded, "packed": packed[None, None].expand(b, 1, s, s)}


@pytest.mark.parametrize("mask", ["causal", "padded", "packed"])
def test_short_attention_equals_sdpa_fp32(mask):
    """The same math as SDPA, GQA included: fp32 outputs and all three gradients within 1e-5."""
    q, k, v = _qkv(2, 6, 2, 10, 8, torch.float32)
    g = torch.randn(2, 6, 10, 8)
    allowed = _masks(2, 10)[mask]
    ref = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True),
                 q, k, v, g)
    new = _grads(lambda q, k, v: short_attention(q, k, v, allowed, 8 ** -0.5), q, k, v, g)
    for a, b in zip(new, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_short_attention_bf16_error_no_worse_than_flash():
    """bf16: measured against an fp64 reference, the short path errs no more than SDPA's flash kernel (x1.25)."""
    q, k, v = _qkv(2, 6, 2, 24, 16, torch.bfloat16)
    g = torch.randn(2, 6, 24, 16, dtype=torch.bfloat16)
    causal = _masks(2, 24)["causal"]
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    exact = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                   q64, k64, v64, g.double())
    flash = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                   q, k, v, g)
    new = _grads(lambda q, k, v: short_attention(q, k, v, causal, 16 ** -0.5), q, k, v, g)
    for n, f, e in zip(new, flash, exact):
        e = e.float()
        err_new, err_flash = (n - e).norm() / e.norm(), (f - e).norm() / e.norm()
        assert err_new < 1.25 * err_flash + 1e-4, (err_new, err_flash)


def test_dispatch_only_in_16bit_training():
    """Grad mode + 16-bit on CPU takes the short path; no-grad and fp32 take SDPA (bit-identical to it)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Module:
        num_key_value_groups, is_causal = 3, True

    for dtype, grad, short in [(torch.bfloat16, True, True), (torch.bfloat16, False, False),
                               (torch.float32, True, False)]:
        q, k, v = (t.detach() for t in _qkv(1, 6, 2, 12, 8, dtype))
        with torch.set_grad_enabled(grad):
            ours, _ = short_attention_forward(Module(), q, k, v, None)
            ref, _ = sdpa_attention_forward(Module(), q, k, v, None)
            direct = short_attention(q, k, v, _masks(1, 12)["causal"], 8 ** -0.5).transpose(1, 2)
        assert torch.equal(ours, direct if short else ref)


def test_tiny_model_training_step_short_vs_sdpa(tiny_model_dir):
    """A bf16 4-bit tiny model: loss and every LoRA gradient with the short path vs SDPA, padded batch."""
    from qlora_kit import LoraConfig, add_lora
    from qlora_kit.training.loss import causal_lm_loss

    model, _ = load_tiny(tiny_model_dir, compute_dtype="bf16")
    assert model.config._attn_implementation == NAME  # load_model switched it on CPU
    torch.manual_seed(0)
    add_lora(model, LoraConfig(r=8, alpha=16))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(0, 100, (3, 16))
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}

    def step():
        model.zero_grad(set_to_none=True)
        loss, n = causal_lm_loss(model, batch)
        loss.backward()
        return loss.detach() / n, torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    loss_short, g_short = step()
    set_short_attention(False)
    try:
        loss_ref, g_ref = step()
    finally:
        set_short_attention(True)
    torch.testing.assert_close(loss_short, loss_ref, atol=2e-3, rtol=2e-3)
    assert (g_short - g_ref).norm() / g_ref.norm() < 3e-2  # bf16 level: flash vs math differ by ~3.5e-2 here
