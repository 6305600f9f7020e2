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


def test_dtype_names_come_from_the_one_table():
    """Config, CLI and hardware speak qlora_kit.dtypes' vocabulary: short names, long names accepted on input."""
    import pytest

    from qlora_kit.cli import build_parser
    from qlora_kit.config import ConfigError, ModelConfig, QuantConfig
    from qlora_kit.dtypes import DTYPES

    for d in DTYPES:
        ModelConfig(path="m", compute_dtype=d.name).validate()
        ModelConfig(path="m", compute_dtype=d.long).validate()
        QuantConfig(quant_storage=d.long).validate()
        assert hardware.choose_compute_dtype(d.name) is d.torch
        assert build_parser().parse_args(["generate", "--compute-dtype", d.long]).compute_dtype == d.name
    with pytest.raises(ConfigError, match="use auto, fp32, bf16, fp16"):
        ModelConfig(path="m", compute_dtype="F8").validate()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--compute-dtype", "int3"])
