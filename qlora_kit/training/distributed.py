"""Multi-process training through accelerate: the Accelerator (DDP or FSDP), rank-aware logging, FSDP-QLoRA.

``training.distributed`` picks the strategy when the run is launched with several processes
(``accelerate launch`` or ``torchrun``); a single process ignores it.

* ``ddp``: every rank holds the whole 4-bit base and the adapters. DDP registers only parameters that
  require grad, so only LoRA gradients are all-reduced.
* ``fsdp``: FSDP-QLoRA. The packed 4-bit weights are stored in the compute dtype (``quant.quant_storage``)
  so FSDP can flatten and shard them with the other base weights; decoder layers are FSDP units, and every
  LoRA adapter is its own small unit (so no flat parameter mixes trainable fp32 and frozen base weights);
  ``use_orig_params=True`` keeps the original ``Params4bit`` objects and their quantization states.
  Gradient checkpointing stays transformers' non-reentrant per-layer checkpointing.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os

import torch
from torch import nn

from qlora_kit.dtypes import lookup

log = logging.getLogger("qlora_kit")

# Seconds a collective (or the process-group rendezvous) may wait for a peer before the rank fails,
# instead of hanging forever when another rank died without tearing the group down.
DEFAULT_TIMEOUT_S = 1800


def launched_world_size() -> int:
    """Processes in this launch, from the environment torchrun/accelerate set (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def configure_quant_for_fsdp(config, dtype: torch.dtype) -> None:
    """FSDP flattens a unit's parameters into one tensor of one dtype: store the 4-bit codes in ``dtype``."""
    want = lookup(dtype).long  # quant_storage takes torch's long names ("bfloat16")
    if config.quant.bits != 4:
        from qlora_kit.config import ConfigError

        raise ConfigError(f"training.distributed=fsdp needs quant.bits=4 (got {config.quant.bits}): bitsandbytes' "
                          "8-bit weights cannot be flattened by FSDP")
    if config.quant.quant_storage != want:
        log.info("training.distributed=fsdp: quant.quant_storage %s -> %s (the compute dtype), so FSDP can "
                 "flatten and shard the packed 4-bit weights", config.quant.quant_storage, want)
        config.quant.quant_storage = want


def _is_lora_unit(module: nn.Module) -> bool:
    """Modules that own trainable parameters directly: LoRA adapters and full trainable copies."""
    from qlora_kit.model.lora import LoraAdapter, TrainableCopy

    return isinstance(module, (LoraAdapter, TrainableCopy))


def decoder_layer_classes(model: nn.Module) -> set[type]:
    """The decoder-layer classes to wrap: transformers' ``_no_split_modules``, else ``*DecoderLayer`` types."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not found:
        found = {type(m) for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "Block"))}
    if not found:
        from qlora_kit.config import ConfigError

        raise ConfigError(f"training.distributed=fsdp: no decoder layer class found in {type(model).__name__} "
                          "(no _no_split_modules, no *DecoderLayer module)")
    return found


def fsdp_wrap_policy(model: nn.Module):
    """Auto-wrap policy: each decoder layer is a unit, and each LoRA adapter a unit of its own."""
    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

    return functools.partial(_or_policy, policies=[
        functools.partial(lambda_auto_wrap_policy, lambda_fn=_is_lora_unit),
        functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=decoder_layer_classes(model)),
    ])


def make_accelerator(cpu: bool, timeout_s: float | None = None, **tracking):
    """An Accelerator whose process group times out (gloo on CPU, nccl on GPUs) instead of hanging.

    ``tracking``: ``log_with``/``project_dir`` for experiment trackers (``tracking.accelerator_kwargs``).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    if launched_world_size() == 1:
        return Accelerator(cpu=cpu, **tracking)
    timeout_s = timeout_s or float(os.environ.get("QLORA_KIT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    gpu = not cpu and torch.cuda.is_available()
    kwargs = InitProcessGroupKwargs(backend="nccl" if gpu else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    # every buffer is the same on every rank by construction (rotary tables; a DPO reference's frozen LoRA copy,
    # as large as the adapter): DDP need not broadcast them before each forward
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    return Accelerator(cpu=cpu, kwargs_handlers=[kwargs, ddp], **tracking)


def quiet_other_ranks() -> None:
    """Ranks other than 0 (``RANK`` set by torchrun/accelerate launch) log warnings and errors only."""
    if int(os.environ.get("RANK", "0")) != 0:
        log.setLevel(logging.WARNING)
        for noisy in ("transformers", "accelerate"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def wrap_fsdp(accelerator, step_fn: nn.Module, model: nn.Module) -> nn.Module:
    """Wrap ``step_fn`` (SupervisedLoss over ``model``) in FSDP with the QLoRA policy; returns the wrapped module."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    wrapped = FSDP(step_fn, sharding_strategy=ShardingStrategy.FULL_SHARD, auto_wrap_policy=fsdp_wrap_policy(model),
                   use_orig_params=True, limit_all_gathers=True,
                   device_id=accelerator.device if accelerator.device.type != "cpu" else torch.device("cpu"))
    _move_quant_states(model, accelerator.device)
    from torch.distributed.fsdp._runtime_utils import _lazy_init

    _lazy_init(wrapped, wrapped)  # mark the root now: gathering a LoRA unit first (resume) would make it a root
    return wrapped


def _move_quant_states(model: nn.Module, device: torch.device) -> None:
    """FSDP moves the flat parameters; the 4-bit layers' quantization states must follow them."""
    for module in model.modules():
        state = getattr(module, "quant_state", None)
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None) or state
        if state is not None and hasattr(state, "to"):
            state.to(device)  # QuantState.to moves absmax/code (and the nested state) in place
            module.quant_state = state
            if weight is not None:
                weight.quant_state = state


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return isinstance(module, FSDP)


@contextlib.contextmanager
def full_adapter_params(step_fn: nn.Module):
    """Inside, every LoRA parameter holds its full (unsharded) value on every rank. Collective under FSDP.

    Only the small LoRA units are gathered (``recurse=False``), never the 4-bit base. Elsewhere a no-op.
    """
    if not is_fsdp(step_fn):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with contextlib.ExitStack() as stack:
        for unit in FSDP.fsdp_modules(step_fn):
            if _is_lora_unit(unit.module):
                stack.enter_context(FSDP.summon_full_params(unit, recurse=False, writeback=True, with_grads=False))
        yield


def clip_grad_norm(step_fn: nn.Module, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global gradient norm and clipping; under FSDP over the sharded gradients of all ranks."""
    if is_fsdp(step_fn):
        return step_fn.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


class _StateDictOnly:
    """Stands in for an optimizer where only ``state_dict()`` is needed (checkpoint writing)."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def gathered_optimizer(step_fn: nn.Module, optimizer):
    """The optimizer whose ``state_dict()`` a checkpoint saves.

    Under FSDP the optimizer state is sharded, and ``FSDP.optim_state_dict`` on CPU/gloo (torch 2.13) returned
    exp_avg and exp_avg_sq as the same gathered tensor, so FSDP checkpoints hold no optimizer state (only the
    gathered adapter and the trainer state) and cannot be resumed; see docs/distributed.md.
    """
    if not is_fsdp(step_fn):
        return optimizer
    return _StateDictOnly({"state": {}, "param_groups": [], "fsdp": "optimizer state not saved under FSDP"})


_FSDP_PREFIX = "_fsdp_wrapped_module."


class UnwrappedNames:
    """A view of an FSDP-wrapped model under its original module names (for adapter files and resume).

    FSDP puts ``_fsdp_wrapped_module`` into the names of the modules it wraps; PEFT keys must not carry it.
    """

    def __init__(self, model: nn.Module):
        self._model = model

    def named_modules(self, *args, **kwargs):
        for name, module in self._model.named_modules(*args, **kwargs):
            if not is_fsdp(module):  # the wrapped module follows under the same clean name
                yield name.replace(_FSDP_PREFIX, "").removesuffix("._fsdp_wrapped_module"), module

    def get_submodule(self, target: str) -> nn.Module:
        return dict(self.named_modules())[target]

    def __getattr__(self, name):
        return getattr(self._model, name)


def adapter_view(model: nn.Module, step_fn: nn.Module):
    """``model`` itself, or under FSDP a view of it with FSDP's wrapper names removed."""
    return UnwrappedNames(model) if is_fsdp(step_fn) else model
