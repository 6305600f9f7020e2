"""The chunked supervised loss against full-logit F.cross_entropy: values, gradients, chunking, edge cases."""
import pytest
import torch
import torch.nn.functional as F
from conftest import load_tiny
from torch import nn

from qlora_kit import LoraConfig, add_lora
from qlora_kit.training.loss import causal_lm_loss, supervised_loss

TOL = dict(atol=2e-5, rtol=2e-5)  # fp32 throughout; only the summation order differs


def _reference(logits: torch.Tensor, labels: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """Independent reference: full logits, shifted, F.cross_entropy summed over labels != -100."""
    logits = logits.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), reduction="sum")


def _labels(ids: torch.Tensor, p_keep: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(ids.shape, generator=g) < p_keep
    return torch.where(keep, ids, torch.full_like(ids, -100))


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_supervised_loss_matches_full_logits(chunk, softcap):
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 11, 16, requires_grad=True)  # [b, s, h]
    labels = _labels(torch.randint(0, 50, (3, 11)), 0.6, seed=1)
    loss, n = supervised_loss(hidden, labels, head, chunk_size=chunk, softcap=softcap)
    loss.backward()
    got = (hidden.grad.clone(), head.weight.grad.clone())
    hidden.grad, head.weight.grad = None, None
    ref = _reference(head(hidden), labels, softcap)
    ref.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert n == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(got[0], hidden.grad, **TOL)
    torch.testing.assert_close(got[1], head.weight.grad, **TOL)


def test_head_sees_only_supervised_rows_in_chunks():
    head = nn.Linear(8, 30, bias=False)
    calls = []
    head.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    hidden = torch.randn(2, 20, 8, requires_grad=True)
    labels = _labels(torch.randint(0, 30, (2, 20)), 0.5, seed=3)
    loss, n = supervised_loss(hidden, labels, head, chunk_size=4)
    loss.backward()  # backward recomputes each chunk under checkpointing
    assert max(calls) <= 4
    assert sum(calls) == 2 * n  # each supervised row once in forward, once in the recomputation


def test_zero_supervised_tokens_gives_zero_without_nan():
    head = nn.Linear(8, 30)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.full((2, 5), -100)
    labels[:, 0] = 3  # position 0 is never a target
    loss, n = supervised_loss(hidden, labels, head)
    loss.backward()
    assert n == 0 and loss.item() == 0.0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    model, tok = load_tiny(tiny_model_dir)
    add_lora(model, LoraConfig(r=4, alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # nonzero B so A's gradients are nonzero too
    return model, tok


def _lora_grads(model) -> dict:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


def test_causal_lm_loss_matches_model_logits_and_lora_grads(lora_model):
    model, _ = lora_model
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, model.config.vocab_size, (2, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding in row 1
    labels = _labels(ids, 0.7, seed=6).masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    model.zero_grad(set_to_none=True)
    ref = _reference(model(input_ids=ids, attention_mask=mask).logits, labels)
    ref.backward()
    ref_grads = _lora_grads(model)
    assert len(ref_grads) > 0 and all(g.abs().sum() > 0 for g in ref_grads.values())

    for chunk in (1, 7, 4096):
        loss, n = causal_lm_loss(model, batch, chunk_size=chunk)
        loss.backward()
        grads = _lora_grads(model)
        assert n == int((labels[:, 1:] != -100).sum())
        torch.testing.assert_close(loss, ref.detach(), **TOL)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_causal_lm_loss_reads_softcap_from_config(lora_model):
    model, _ = lora_model
    ids = torch.randint(3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(7))
    batch = {"input_ids": ids, "labels": ids}
    plain, _ = causal_lm_loss(model, batch)
    model.config.final_logit_softcapping = 0.5
    try:
        capped, _ = causal_lm_loss(model, batch)
        hidden = model.base_model(input_ids=ids).last_hidden_state
        ref = _reference(model.lm_head(hidden), ids, softcap=0.5)
    finally:
        model.config.final_logit_softcapping = None
    torch.testing.assert_close(capped, ref, **TOL)
    assert not torch.allclose(capped, plain)


def _frozen_head(bias: bool, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=bias).to(dtype)
    head.requires_grad_(False)
    return head


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap,scale", [(None, 1.0), (5.0, 1.0), (None, 0.5), (3.0, 2.0)])
@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_fused_head_loss_and_input_grad_match_full_logits(chunk, softcap, scale, bias):
    """A frozen plain head takes the fused path (gradient computed in forward): same loss and hidden grads as
    autograd through full logits, at fp32 tolerance."""
    from qlora_kit.training.loss import _fusable

    head = _frozen_head(bias)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    labels = _labels(torch.randint(0, 50, (3, 11)), 0.6, seed=1)
    assert _fusable(head, hidden)
    loss, _ = supervised_loss(hidden, labels, head, chunk_size=chunk, softcap=softcap, logit_scale=scale)
    (loss * 0.37).backward()
    got = hidden.grad.clone()
    hidden.grad = None
    ref = _reference(head(hidden) * scale, labels, softcap)
    (ref * 0.37).backward()
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(got, hidden.grad, **TOL)


def test_fused_head_token_log_probs_take_per_row_upstream_gradients():
    """reduction 'none' (DPO's log-probs): each row's gradient is scaled by its own upstream gradient."""
    from qlora_kit.training.loss import token_log_probs

    head = _frozen_head(bias=False)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = _labels(torch.randint(0, 50, (2, 9)), 0.7, seed=2)
    logps, mask = token_log_probs(hidden, labels, head, chunk_size=4)
    weights = torch.linspace(-1.0, 2.0, len(logps))
    (logps * weights).sum().backward()
    got = hidden.grad.clone()
    hidden.grad = None
    ref = torch.log_softmax(head(hidden)[:, :-1][mask].float(), -1).gather(1, labels[:, 1:][mask][:, None]).squeeze(1)
    (ref * weights).sum().backward()
    torch.testing.assert_close(logps, ref, **TOL)
    torch.testing.assert_close(got, hidden.grad, **TOL)


def test_fused_head_in_bf16_matches_the_checkpointed_path():
    """bf16 hidden and head: the fused path and autograd through the head agree to bf16 rounding."""
    from qlora_kit.training import loss as loss_mod

    head = _frozen_head(bias=False, dtype=torch.bfloat16)
    hidden = torch.randn(4, 12, 16, dtype=torch.bfloat16, requires_grad=True)
    labels = _labels(torch.randint(0, 50, (4, 12)), 0.8, seed=4)
    fused, _ = supervised_loss(hidden, labels, head, chunk_size=5)
    fused.backward()
    got = hidden.grad.clone()
    hidden.grad = None
    head.register_forward_pre_hook(lambda mod, inp: None)  # a hooked head takes the checkpointed autograd path
    assert not loss_mod._fusable(head, hidden)
    plain, _ = supervised_loss(hidden, labels, head, chunk_size=5)
    plain.backward()
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got, hidden.grad, atol=2e-3, rtol=1e-2)


def test_fused_head_not_used_for_a_trainable_head_or_without_grad():
    from qlora_kit.training.loss import _fusable

    head = nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 16, requires_grad=True)
    assert not _fusable(head, hidden)  # the head trains (modules_to_save): autograd must reach its weight
    head.requires_grad_(False)
    with torch.no_grad():
        assert not _fusable(head, hidden)  # evaluation: no gradient to compute
