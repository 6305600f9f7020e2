"""NF4 code table, quantization error and storage cost, against independent references."""

import pytest
import torch
from torch import nn

from qlora_kit.config import QuantConfig
from qlora_kit.model.quant import NF4_CODE, dequantize_weight, quantize_roundtrip


def nf4_from_normal_quantiles(offset: float = 0.9677083) -> torch.Tensor:
    """QLoRA's construction (App. E): 8 positive and 7 negative quantiles of N(0,1), an exact zero, scaled to [-1, 1]."""
    normal = torch.distributions.Normal(0.0, 1.0)
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return values / values.abs().max()


def test_nf4_table_matches_normal_quantiles_and_bitsandbytes():
    import bitsandbytes.functional as F

    ours = torch.tensor(NF4_CODE, dtype=torch.float64)
    assert len(ours) == 16 and (ours == 0).sum() == 1 and (ours < 0).sum() == 7
    torch.testing.assert_close(ours, nf4_from_normal_quantiles(), atol=1e-6, rtol=0)
    torch.testing.assert_close(F.get_4bit_type("nf4", device="cpu").double(), ours, atol=1e-7, rtol=0)


def test_nf4_error_on_gaussian_weights():
    torch.manual_seed(0)
    w = torch.randn(1024, 1024)
    err = (quantize_roundtrip(w, QuantConfig()) - w)
    assert err.abs().mean().item() == pytest.approx(0.0728, abs=0.002)
    assert err.pow(2).mean().sqrt().item() == pytest.approx(0.092, abs=0.003)
    # every dequantized value is a code times its block's absmax
    w_hat = quantize_roundtrip(w, QuantConfig(double_quant=False)).reshape(-1, 64)
    absmax = w.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    codes = torch.tensor(NF4_CODE)
    nearest = (w_hat / absmax).unsqueeze(-1).sub(codes).abs().min(-1).values
    assert nearest.max().item() < 1e-3


def test_storage_cost_with_double_quant_is_4_127_bits():
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(2048, 2048, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(torch.randn(2048, 2048), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    layer = layer.to("cpu")
    from qlora_kit.model.load import _quant_state_bytes

    n = 2048 * 2048
    total = layer.weight.numel() + _quant_state_bytes(layer.weight.quant_state)
    assert total * 8 / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), rel=0.01)
    assert 4.127 == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=5e-4)


def test_dequantize_weight_of_plain_linear_is_its_weight():
    lin = nn.Linear(8, 4)
    assert torch.equal(dequantize_weight(lin), lin.weight.float())


def test_roundtrip_of_a_bf16_weight_is_not_rounded_to_bf16():
    """A bf16 checkpoint's weight quantizes to the same codes, and dequantizes exactly (fp32), as its fp32 cast."""
    torch.manual_seed(0)
    w = (torch.randn(256, 128) * 0.05).to(torch.bfloat16)
    exact = quantize_roundtrip(w.float(), QuantConfig())
    assert torch.equal(quantize_roundtrip(w, QuantConfig()), exact)
    assert not torch.equal(exact.to(torch.bfloat16).float(), exact)  # bf16 would have rounded it
