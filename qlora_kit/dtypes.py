"""One table of the floating-point dtypes qlora-kit names: short name <-> torch dtype <-> bytes.

Every config field, CLI flag, report and file header that names a dtype goes through here, so a dtype has one
vocabulary everywhere: the short names ``fp32``, ``bf16`` and ``fp16``. The long torch names (``float32``,
``bfloat16``, ``float16``) and safetensors' header names (``F32``, ``BF16``, ``F16``) are accepted on input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DType:
    """One floating-point dtype under all of its names."""

    name: str  # the short name qlora-kit prints and writes: "fp32", "bf16", "fp16"
    torch: torch.dtype  # the torch dtype
    long: str  # torch's own name without the "torch." prefix: "float32", "bfloat16", "float16"
    safetensors: str  # the safetensors header name: "F32", "BF16", "F16"

    @property
    def bytes(self) -> int:
        """Bytes per element."""
        return self.torch.itemsize


DTYPES: tuple[DType, ...] = (
    DType("fp32", torch.float32, "float32", "F32"),
    DType("bf16", torch.bfloat16, "bfloat16", "BF16"),
    DType("fp16", torch.float16, "float16", "F16"),
)
NAMES: tuple[str, ...] = tuple(d.name for d in DTYPES)  # the short names, for choices and error messages
_BY_NAME = {alias: d for d in DTYPES for alias in (d.name, d.long, d.safetensors)}
_BY_TORCH = {d.torch: d for d in DTYPES}


def lookup(dtype: str | torch.dtype) -> DType:
    """The table row for a name in any of its spellings, or a torch dtype; raises ValueError naming the choices."""
    row = _BY_TORCH.get(dtype) if isinstance(dtype, torch.dtype) else _BY_NAME.get(str(dtype).removeprefix("torch."))
    if row is None:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(NAMES)}")
    return row


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/``"BF16"``/``torch.bfloat16`` -> ``torch.bfloat16`` (likewise fp32, fp16)."""
    return lookup(name).torch


def dtype_name(dtype: str | torch.dtype) -> str:
    """The short name (``"bf16"``) of a torch dtype or of any spelling of its name."""
    return lookup(dtype).name


def dtype_bytes(dtype: str | torch.dtype) -> int:
    """Bytes per element of a dtype given by name or torch dtype."""
    return lookup(dtype).bytes
