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
    """torch's AdamW, fused (one kernel over all parameters) where every parameter allows it.

    On a CPU the fused kernel stepped 4.9M LoRA parameters in 0.056 s, against 0.27 s for the foreach
    version and 1.5 s for bitsandbytes' 8-bit AdamW (AMD EPYC, AVX512-BF16, docs/benchmarks.md).
    """
    import torch

    params = list(params)
    tensors = [t for group in params for t in (group["params"] if isinstance(group, dict) else [group])]
    fused = bool(tensors) and all(t.is_floating_point() and t.device.type in ("cpu", "cuda") for t in tensors)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


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
    fallback: OptimizerSpec | None = None  # used instead on other device types (unpaged)

    def state_bytes(self, numel: int) -> float:
        """Bytes of optimizer state for one parameter tensor of ``numel`` elements (two AdamW moments).

        bitsandbytes keeps tensors under 4096 elements in 32-bit even with an 8-bit optimizer.
        """
        if self.state_bits == 8 and numel >= 4096:
            return 2 * numel + numel / 256 * 8
        return 8.0 * numel


_ADAMW_8BIT = OptimizerSpec("adamw_8bit", _bnb("AdamW8bit"), 8, paged=False)
_ADAMW = OptimizerSpec("adamw", _torch_adamw, 32, paged=False)

OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        # Off CUDA there is no paged memory, and on a CPU bitsandbytes' AdamW runs far slower than torch's fused
        # one: the paged optimizers fall back to torch AdamW there (+6 bytes of state per LoRA parameter).
        OptimizerSpec("paged_adamw_8bit", _bnb("PagedAdamW8bit"), 8, paged=True, devices=("cuda",), fallback=_ADAMW),
        OptimizerSpec("paged_adamw_32bit", _bnb("PagedAdamW32bit"), 32, paged=True, devices=("cuda",), fallback=_ADAMW),
        _ADAMW_8BIT,
        _ADAMW,
    )
}
OPTIMIZER_NAMES: tuple[str, ...] = tuple(OPTIMIZERS)  # for choices and error messages


def optimizer_spec(name: str) -> OptimizerSpec:
    """The table row of ``name``; raises ValueError naming the choices."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"optimizer {name!r} is unknown; use one of {', '.join(OPTIMIZER_NAMES)}") from None


def resolve_optimizer(name: str, device_type: str) -> OptimizerSpec:
    """The optimizer that runs for ``name`` on ``device_type``: the row itself, or its fallback off its devices."""
    spec = optimizer_spec(name)
    if spec.devices and device_type not in spec.devices and spec.fallback is not None:
        return spec.fallback
    return spec
