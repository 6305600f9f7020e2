"""LoRA adapters that wrap any linear layer (nn.Linear, bnb Linear4bit, Linear8bitLt) by composition.

``h = base(x) + scale * B @ A @ dropout(x)``, with A ``[r, in]`` random and B ``[out, r]`` zero, so a new
adapter leaves the model's function unchanged. Every trainable tensor is named ``lora_*`` or lives in a
``TrainableCopy``, so freezing and saving are name filters.
"""
from __future__ import annotations

import contextlib
import math
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from qlora_kit.config import ConfigError, LoraConfig
from qlora_kit.model.fused import try_fused_forward
from qlora_kit.model.quant import logical_numel

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


class LoraAdapter(nn.Module):
    """One named low-rank update: A ``[r, in]``, B ``[out, r]``, applied as ``scale * B @ A``."""

    def __init__(self, in_features: int, out_features: int, config: LoraConfig, dtype: torch.dtype = torch.float32,
                 trainable: bool = True):
        super().__init__()
        self.r, self.alpha, self.use_rslora = config.r, float(config.alpha), config.use_rslora
        self.trainable = trainable  # False: A and B are non-persistent buffers (a frozen copy: never trained or saved)
        a = torch.empty(config.r, in_features, dtype=dtype)  # [r, in]
        b = torch.zeros(out_features, config.r, dtype=dtype)  # [out, r]
        if trainable:
            self.lora_A, self.lora_B = nn.Parameter(a), nn.Parameter(b)
        else:
            self.register_buffer("lora_A", a, persistent=False)
            self.register_buffer("lora_B", b, persistent=False)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.rank: int = config.r  # active rank: the first `rank` rows of A / columns of B are used
        if not trainable:  # filled by the caller (a copy): draw nothing from the random generator
            a.zero_()
        elif config.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / config.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def scale(self, rank: int | None = None) -> float:
        """alpha / rank (alpha / sqrt(rank) with rsLoRA) at ``rank`` (default: the active rank)."""
        rank = rank or self.rank
        return self.alpha / (math.sqrt(rank) if self.use_rslora else rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``: the adapter's contribution at the active rank."""
        k = self.rank
        a, b = self.lora_A[:k], self.lora_B[:, :k]  # [k, in], [out, k]
        x = self.dropout(x.to(a.dtype))
        return (x @ a.t()) @ b.t() * self.scale(k)

    def delta_weight(self, rank: int | None = None) -> torch.Tensor:
        """The dense update ``scale * B @ A`` as fp32 ``[out, in]`` at ``rank`` (default: the active rank)."""
        k = rank or self.rank
        return (self.lora_B[:, :k].float() @ self.lora_A[:k].float()) * self.scale(k)


class LoraLinear(nn.Module):
    """A frozen base linear layer plus zero or more named LoRA adapters (composition, not inheritance)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []  # names of the adapters applied in forward, in order
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (so code that inspects ``layer.weight`` keeps working)."""
        return self.base.weight

    def add(self, name: str, config: LoraConfig, dtype: torch.dtype = torch.float32) -> LoraAdapter:
        """Create adapter ``name`` on the base layer's device."""
        device = self.base.weight.device
        adapter = LoraAdapter(self.in_features, self.out_features, config, dtype).to(device)
        self.adapters[name] = adapter
        return adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``: base output plus every active adapter's update."""
        fused = try_fused_forward(self, x)  # 4-bit base + one adapter: one autograd function (fused.py)
        if fused is not None:
            return fused
        y = self.base(x)
        for name in self.active:
            y = y + self.adapters[name](x).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={list(self.adapters)}, active={self.active}"


class TrainableCopy(nn.Module):
    """A module trained in full (``modules_to_save``): the frozen original plus named trainable copies."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: list[str] = []

    def add(self, name: str) -> nn.Module:
        """Make a trainable fp32-or-native copy of the original, named ``name``."""
        import copy

        clone = copy.deepcopy(self.original)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.copies[name] = clone
        return clone

    def forward(self, *args, **kwargs):
        chosen = [n for n in self.active if n in self.copies]
        module = self.copies[chosen[-1]] if chosen else self.original
        return module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # e.g. `embed_tokens.weight`, `lm_head.weight`: answer for the original
            return getattr(self._modules["original"], name)


# ---------------------------------------------------------------------------------------------
# Targeting

def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)  # bnb Linear4bit and Linear8bitLt subclass nn.Linear


def layer_index(name: str) -> int | None:
    """The decoder-block number in a module name (``model.layers.3.mlp.up_proj`` -> 3), or None outside the blocks."""
    m = _LAYER_INDEX.search(f".{name}.")
    return int(m.group(1)) if m else None


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full names of the linear layers ``config`` selects; a ConfigError lists the names the model has.

    "all-linear" means every linear layer inside the numbered decoder blocks, never the LM head.
    A list matches module names by suffix (``q_proj`` matches ``model.layers.0.self_attn.q_proj``);
    a string that is not "all-linear" is a regular expression matched against full names.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = {n: m for n, m in model.named_modules() if (_is_linear(m) or isinstance(m, LoraLinear)) and m is not head
               and not n.endswith(".base")}
    spec = config.target_modules
    if spec == "all-linear":
        chosen = [n for n in linears if layer_index(n) is not None]
    elif isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise ConfigError(f"lora.target_modules: invalid regex {spec!r}: {e}") from None
        chosen = [n for n in linears if pattern.fullmatch(n)]
    else:
        chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in spec)]
    if config.layers is not None:
        chosen = [n for n in chosen if layer_index(n) in set(config.layers)]
    if not chosen:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ConfigError(
            f"lora.target_modules={spec!r} (layers={config.layers}) matches no linear layer of this model; "
            f"its linear layers are named: {', '.join(kinds)} (or use 'all-linear')")
    return chosen


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def add_lora(model: nn.Module, config: LoraConfig, name: str = "default",
             dtype: torch.dtype = torch.float32) -> list[str]:
    """Attach adapter ``name`` to the layers ``config`` targets and make it the active one.

    Freezes every parameter except LoRA tensors and ``modules_to_save`` copies. Returns the full names of
    the adapted layers. Raises ConfigError for an invalid config or targets that match nothing.
    """
    config.validate()
    targets = resolve_targets(model, config)
    attach_adapter(model, targets, config, name, dtype)
    return targets


def attach_adapter(model: nn.Module, targets: list[str], config: LoraConfig, name: str,
                   dtype: torch.dtype = torch.float32) -> None:
    """Add adapter ``name`` to exactly the layers ``targets`` (full names) plus ``config.modules_to_save``."""
    for target in targets:
        layer = model.get_submodule(target)
        if not isinstance(layer, LoraLinear):
            layer = LoraLinear(layer)
            _set_submodule(model, target, layer)
        layer.add(name, config, dtype)
    for target in config.modules_to_save:
        for full in _find_modules(model, target):
            wrapper = model.get_submodule(full)
            if not isinstance(wrapper, TrainableCopy):
                wrapper = TrainableCopy(wrapper)
                _set_submodule(model, full, wrapper)
            wrapper.add(name)
    freeze_base(model)
    model.lora_configs = {**getattr(model, "lora_configs", {}), name: config}
    set_active_adapters(model, [name])


def _find_modules(model: nn.Module, target: str) -> list[str]:
    """Full names of the modules named ``target`` (by suffix), outside LoRA wrappers' internals."""
    found = [n for n, m in model.named_modules() if (n == target or n.endswith("." + target))
             and not n.endswith((".original", ".base")) and ".copies." not in n]
    if not found:
        raise ConfigError(f"lora.modules_to_save: no module named {target!r}; "
                          f"top-level modules are {', '.join(n for n, _ in model.named_children())}")
    return found


def freeze_base(model: nn.Module) -> None:
    """requires_grad only on LoRA tensors and trainable copies."""
    for pname, p in model.named_parameters():
        p.requires_grad_(".lora_" in pname or ".copies." in pname or pname.startswith("copies."))


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """(name, layer) for every LoraLinear in the model."""
    for n, m in model.named_modules():
        if isinstance(m, LoraLinear):
            yield n, m


def set_active_adapters(model: nn.Module, names: list[str]) -> None:
    """Apply exactly these adapters (in order) everywhere; ``[]`` gives the base model back."""
    known = set(getattr(model, "lora_configs", {}))
    missing = [n for n in names if n not in known]
    if missing:
        raise KeyError(f"no adapter named {missing[0]!r}; loaded adapters: {sorted(known)}")
    for module in model.modules():
        if isinstance(module, (LoraLinear, TrainableCopy)):
            pool = module.adapters if isinstance(module, LoraLinear) else module.copies
            module.active = [n for n in names if n in pool]


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters currently applied."""
    for module in model.modules():
        if isinstance(module, LoraLinear):
            return list(module.active)
    return []


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the bare base model inside the ``with`` block, then restore the active adapters."""
    with adapters_active(model, []):
        yield model


@contextlib.contextmanager
def adapters_active(model: nn.Module, names: list[str]):
    """Apply exactly adapters ``names`` inside the ``with`` block, then restore the ones active before."""
    previous = active_adapters(model)
    set_active_adapters(model, names)
    try:
        yield model
    finally:
        set_active_adapters(model, previous)


def set_rank(model: nn.Module, rank: int | None, name: str | None = None) -> None:
    """Set the active rank of every trainable adapter (or of adapter ``name``); None restores each adapter's
    full r. A frozen copy (``freeze_reference``) keeps its rank unless named."""
    for _, layer in lora_layers(model):
        for adapter_name, adapter in layer.adapters.items():
            if adapter_name == name or (name is None and adapter.trainable):
                adapter.rank = min(rank, adapter.r) if rank else adapter.r


def inference_rank(config: LoraConfig) -> int:
    """The rank evaluation and inference use: ``config.active_rank``, or the full ``r`` when it is 0."""
    return min(config.active_rank or config.r, config.r)


def sample_rank(rng, config: LoraConfig) -> int:
    """One training step's rank in ``[r_min, r]``, drawn from ``rng`` (a ``random.Random``).

    "uniform" (DyLoRA, QDyLoRA): every rank equally often. "log_uniform": ``floor(r_min * ((r + 1) / r_min) ** u)``
    with u uniform in [0, 1), i.e. P(b) proportional to log((b + 1) / b), weighted toward small ranks.
    """
    lo, hi = config.r_min, config.r
    if config.rank_sampling == "log_uniform":
        return min(hi, int(lo * ((hi + 1) / lo) ** rng.random()))
    return rng.randint(lo, hi)


# ---------------------------------------------------------------------------------------------
# Parameter report

def _module_kind(param_name: str) -> str:
    parts = param_name.split(".")[:-1]
    keep = []
    skip = 0
    for part in parts:
        if skip:
            skip -= 1
            continue
        if part in ("adapters", "copies"):
            skip = 1
            continue
        if part in ("base", "original"):
            continue
        keep.append(part)
    return keep[-1] if keep else param_name


@dataclass
class ParamReport:
    """Trainable and total parameter counts, overall and per module type (4-bit weights counted unpacked)."""

    rows: dict[str, tuple[int, int]]  # module type -> (trainable, total)
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        lines = [f"{'module':<24}{'trainable':>14}{'total':>16}{'%':>9}"]
        for kind, (t, n) in sorted(self.rows.items()):
            lines.append(f"{kind:<24}{t:>14,}{n:>16,}{100.0 * t / max(n, 1):>8.2f}%")
        lines.append(f"{'all':<24}{self.trainable:>14,}{self.total:>16,}{self.percent:>8.2f}%")
        return "\n".join(lines)


def parameter_report(model: nn.Module) -> ParamReport:
    """Count trainable and total parameters per module type (q_proj, lm_head, ...)."""
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    seen: set[int] = set()
    for pname, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        n = logical_numel(p)
        row = rows[_module_kind(pname)]
        row[1] += n
        if p.requires_grad:
            row[0] += n
    trainable = sum(t for t, _ in rows.values())
    total = sum(n for _, n in rows.values())
    return ParamReport({k: (t, n) for k, (t, n) in rows.items()}, trainable, total)
