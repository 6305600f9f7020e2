"""The optimizer table (qlora_kit.optimizers) is the one list of names: config, CLI, planner and builder agree."""
import logging

import bitsandbytes.optim as bnb_optim
import pytest
import torch

from qlora_kit.cli import build_parser
from qlora_kit.config import ConfigError, TrainingConfig
from qlora_kit.optimizers import OPTIMIZER_NAMES, OPTIMIZERS, optimizer_spec
from qlora_kit.planning.estimate import optimizer_bytes
from qlora_kit.training.optim import build_optimizer


def test_config_and_cli_accept_exactly_the_table():
    for name in OPTIMIZER_NAMES:
        TrainingConfig(optimizer=name).validate()
        assert build_parser().parse_args(["plan", "--model", "m", "--optimizer", name]).optimizer == name
    with pytest.raises(ConfigError, match=r"training\.optimizer: 'sgd' is unknown; use paged_adamw_8bit"):
        TrainingConfig(optimizer="sgd").validate()
    with pytest.raises(ValueError, match="adamw_8bit"):
        optimizer_spec("sgd")


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_build_optimizer_on_cpu_builds_the_table_row(name, caplog):
    """Paged optimizers fall back to their unpaged twin on the CPU, and say so; every row steps."""
    param = torch.nn.Parameter(torch.randn(64, 128))
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        opt = build_optimizer([param], TrainingConfig(optimizer=name, lr=1e-3), torch.device("cpu"))
    on_cpu = {"adamw": torch.optim.AdamW, "adamw_8bit": bnb_optim.AdamW8bit,
              "paged_adamw_8bit": torch.optim.AdamW, "paged_adamw_32bit": torch.optim.AdamW}
    assert type(opt) is on_cpu[name]
    if on_cpu[name] is torch.optim.AdamW:
        assert opt.param_groups[0]["fused"] is True  # torch's one-kernel AdamW: far faster than bnb's on a CPU
    assert ("paged memory needs a CUDA GPU" in caplog.text) == OPTIMIZERS[name].paged
    param.grad = torch.ones_like(param)
    before = param.detach().clone()
    opt.step()
    assert not torch.equal(before, param.detach())
    assert opt.param_groups[0]["lr"] == 1e-3


def test_planner_state_bytes_follow_the_table():
    sizes = [100, 4096, 1 << 20]  # bitsandbytes keeps tensors under 4096 elements in 32 bit
    assert optimizer_bytes(sizes, "adamw") == 8 * sum(sizes)
    assert optimizer_bytes(sizes, "paged_adamw_32bit") == 8 * sum(sizes)
    eight = 8 * 100 + sum(2 * n + n / 256 * 8 for n in sizes[1:])
    assert optimizer_bytes(sizes, "adamw_8bit") == optimizer_bytes(sizes, "paged_adamw_8bit") == eight
