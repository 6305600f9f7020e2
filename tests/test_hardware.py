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


def test_cpu_threads_drop_to_one_when_other_processes_compete(monkeypatch):
    """All cores on an idle machine; one thread when the load average says the cores are already busy; the
    environment decides when it names a count."""
    import os

    import torch

    from qlora_kit.hardware import choose_cpu_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("QLORA_KIT_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    try:
        monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
        assert choose_cpu_threads() == 2
        monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 1.0, 1.0))
        assert choose_cpu_threads() == 1
        monkeypatch.setenv("QLORA_KIT_THREADS", "2")
        assert choose_cpu_threads() == 2
    finally:
        torch.set_num_threads(before)
