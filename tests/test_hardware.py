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


def test_cpu_threads_follow_the_idle_cores(monkeypatch):
    """One thread per idle core (at least one): all cores on an idle machine, one when a competing process keeps
    one of two cores busy; the load average when /proc/stat is unreadable; the environment decides when set."""
    import os

    import torch

    from qlora_kit import hardware

    before = torch.get_num_threads()
    monkeypatch.delenv("QLORA_KIT_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(hardware, "usable_cores", lambda: [0, 1])
    try:
        for idle, threads in ((1.9, 2), (0.9, 1), (0.0, 1)):
            monkeypatch.setattr(hardware, "idle_cores", lambda idle=idle: idle)
            assert hardware.choose_cpu_threads() == threads
        monkeypatch.setattr(hardware, "idle_cores", lambda: None)
        monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
        assert hardware.choose_cpu_threads() == 2
        monkeypatch.setattr(os, "getloadavg", lambda: (1.1, 1.0, 1.0))
        assert hardware.choose_cpu_threads() == 1
        monkeypatch.setenv("QLORA_KIT_THREADS", "2")
        assert hardware.choose_cpu_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_idle_cores_reads_proc_stat():
    import os

    from qlora_kit.hardware import idle_cores, usable_cores

    idle = idle_cores(0.05)
    if not os.path.exists("/proc/stat"):
        assert idle is None
    else:  # counted over the CPUs this process may run on (taskset / cpuset), not the whole machine
        assert 0.0 <= idle <= len(usable_cores()) + 1e-9
    if hasattr(os, "sched_getaffinity"):
        assert usable_cores() == sorted(os.sched_getaffinity(0))
