"""One table of the optimizers qlora-kit offers: name -> factory, state bytes per parameter, paging, devices.

Config validation (``TrainingConfig.optimizer``), the CLI's choices, the memory planner (state bytes) and
``training.optim.build_optimizer`` all read ``OPTIMIZERS``. Adding an optimizer is one row here. The module sits
at the bottom layer and imports neither torch nor bitsandbytes: each factory imports its library when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _torch_adamw(params: Any, **kwargs: Any) -> Any:
    import torch

    return torch.optim.AdamW(params, **kwargs)


def _bnb(class_name: str) -> Callable[..., Any]:
    """A factory for ``bitsandbytes.optim.<class_name>`` that imports bitsandbytes only when called."""

    def factory(params: Any, **kwargs: Any) -> Any:
        import bitsandbytes.optim as bnb_optim

        return getattr(bnb_optim, class_name)(params, **kwargs)

    factory.__name__ = f"bitsandbytes.optim.{class_name}"
    return factory


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer: how to build it and what its state costs."""

    name: str  # the config / CLI name
    factory: Callable[..., Any]  # (params, lr=, weight_decay=, betas=, eps=) -> torch.optim.Optimizer
    state_bits: int  # 32: two fp32 moments; 8: two uint8 moments + an fp32 absmax per 256 (bitsandbytes)
    paged: bool  # states in CUDA unified memory: they can spill to host memory under pressure
    devices: tuple[str, ...] = ()  # device types it needs (empty: any)
    fallback: OptimizerSpec | None = None  # used instead on other devices: same precision, unpaged

    def state_bytes(self, numel: int) -> float:
        """Bytes of optimizer state for one parameter tensor of ``numel`` elements (two AdamW moments).

        bitsandbytes keeps tensors under 4096 elements in 32-bit even with an 8-bit optimizer.
        """
        if self.state_bits == 8 and numel >= 4096:
            return 2 * numel + numel / 256 * 8
        return 8.0 * numel


_BNB_ADAMW_32BIT = OptimizerSpec("adamw_32bit", _bnb("AdamW32bit"), 32, paged=False)  # paged_adamw_32bit off CUDA
_ADAMW_8BIT = OptimizerSpec("adamw_8bit", _bnb("AdamW8bit"), 8, paged=False)

OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec("paged_adamw_8bit", _bnb("PagedAdamW8bit"), 8, paged=True, devices=("cuda",), fallback=_ADAMW_8BIT),
        OptimizerSpec(
            "paged_adamw_32bit", _bnb("PagedAdamW32bit"), 32, paged=True, devices=("cuda",), fallback=_BNB_ADAMW_32BIT
        ),
        _ADAMW_8BIT,
        OptimizerSpec("adamw", _torch_adamw, 32, paged=False),
    )
}
OPTIMIZER_NAMES: tuple[str, ...] = tuple(OPTIMIZERS)  # for choices and error messages


def optimizer_spec(name: str) -> OptimizerSpec:
    """The table row of ``name``; raises ValueError naming the choices."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"optimizer {name!r} is unknown; use one of {', '.join(OPTIMIZER_NAMES)}") from None
