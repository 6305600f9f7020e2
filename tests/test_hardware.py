import torch

from qlora_kit import hardware


def test_auto_dtype_on_cpu_follows_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert hardware.choose_compute_dtype("auto", cpu) is torch.float32
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert hardware.choose_compute_dtype("auto", cpu) is torch.bfloat16


def test_explicit_dtypes_and_unknown():
    assert hardware.choose_compute_dtype("fp16") is torch.float16
    assert hardware.choose_compute_dtype("bfloat16") is torch.bfloat16
    try:
        hardware.choose_compute_dtype("int3")
    except ValueError as e:
        assert "int3" in str(e)
    else:
        raise AssertionError("expected ValueError")
