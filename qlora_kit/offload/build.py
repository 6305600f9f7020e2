"""A disk-offloaded model that is never whole in memory: quantize a checkpoint straight into an offload folder,
then build the model on top of the memory-mapped folder.

``quantize_to_folder`` reads the safetensors checkpoint one tensor at a time, quantizes every linear layer
that transformers' 4-bit loader would quantize (all but the output head) with the same bitsandbytes call,
and appends the packed codes and quant-state tensors to ``weights.bin``; the other weights (embeddings,
norms, head, biases) go into the same file in the compute dtype. ``build_from_folder`` creates the model's
skeleton on the meta device (accelerate's ``init_empty_weights``), swaps each linear layer for a bitsandbytes
``Linear4bit`` and points every parameter at its own private memory map of the file. Peak memory is one
checkpoint tensor plus its quantized copy, whatever the model size: a 70B-class model loads with 24 GiB.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from qlora_kit.config import ConfigError, QuantConfig
from qlora_kit.offload.runtime import DATA_NAME, OffloadWriter, check_replaceable, file_view, read_index
from qlora_kit.paths import check_output_path

log = logging.getLogger("qlora_kit")


def skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The causal LM for a transformers ``config`` with every parameter on the meta device (buffers real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def quantized_linears(model: nn.Module) -> list[str]:
    """Names of the linear layers the 4-bit loader quantizes: every ``nn.Linear`` except the output head."""
    head = model.get_output_embeddings()
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def source_fingerprint(checkpoint: Path, quant: QuantConfig, dtype: torch.dtype) -> dict:
    """What a folder was written from: the checkpoint's safetensors files (name -> size, mtime) and settings."""
    files = {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in sorted(checkpoint.glob("*.safetensors"))}
    return {"checkpoint": str(checkpoint.resolve()), "files": files, "quant": [quant.quant_type, quant.blocksize,
            quant.double_quant], "dtype": str(dtype).removeprefix("torch.")}


def quantize_to_folder(checkpoint: str | Path, folder: str | Path, quant: QuantConfig, dtype: torch.dtype,
                       progress: bool = True) -> dict:
    """Stream-quantize a safetensors checkpoint into an offload folder; returns the index.

    An existing folder written from the same checkpoint files with the same settings is reused as it is.
    Raises ConfigError when the checkpoint lacks a weight the model needs, before the folder appears.
    """
    import bitsandbytes.functional as bnbF
    from safetensors import safe_open
    from tqdm.auto import tqdm
    from transformers import AutoConfig

    checkpoint, folder = Path(checkpoint), Path(folder)
    if quant.bits != 4:
        raise ConfigError(f"model.offload=disk needs 4-bit quantization (quant.bits={quant.bits}); set quant.bits: 4")
    source = source_fingerprint(checkpoint, quant, dtype)
    if (folder / DATA_NAME).is_file():
        try:
            index = read_index(folder)
            if index.get("source") == source:
                log.info("model.offload=disk: reusing %s (written from the same checkpoint and settings)", folder)
                return index
        except (ValueError, OSError):  # unreadable or other format (JSONDecodeError is a ValueError): rewrite
            pass
    check_output_path(folder, {"model": checkpoint}, "offload folder")
    check_replaceable(folder)
    config = AutoConfig.from_pretrained(str(checkpoint))
    model = skeleton(config, dtype)
    linears = set(quantized_linears(model))
    needed = {name for name, _ in model.named_parameters()}  # tied weights appear once
    files = sorted(checkpoint.glob("*.safetensors"))
    meta = {"source": source, "config": config.to_dict(), "quant_layers": {}}
    with OffloadWriter(folder, meta) as w:
        bar = tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True, disable=not progress,
                   desc="quantizing to the offload file")
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key not in needed:
                        continue  # e.g. the tied head's copy, or buffers saved by old exporters
                    raw = f.get_tensor(key)
                    bar.update(raw.numel() * raw.element_size())
                    t = raw.to(dtype)
                    module = key.removesuffix(".weight")
                    if module != key and module in linears:
                        packed, state = bnbF.quantize_4bit(t.contiguous(), blocksize=quant.blocksize,
                                                           compress_statistics=quant.double_quant,
                                                           quant_type=quant.quant_type)
                        add_4bit(w, module, packed, state)
                    else:
                        w.add(key, t)
                    needed.discard(key)
        bar.close()
        if needed:
            raise ConfigError(f"{checkpoint}: the checkpoint has no tensor for {sorted(needed)[:5]} "
                              f"({len(needed)} missing); is this the model's own checkpoint?")
    return w.index


def add_4bit(writer: OffloadWriter, module: str, packed: torch.Tensor, state) -> None:
    """Append one quantized linear layer (packed codes, absmax, offset, second-level absmax) and its metadata."""
    writer.add(f"{module}.weight", packed)  # [out * in / 2, 1] uint8, two 4-bit codes per byte
    writer.add(f"{module}.weight.absmax", state.absmax)  # [out * in / blocksize]: uint8 with double quant
    if state.nested:
        writer.add(f"{module}.weight.offset", state.offset.reshape(()))  # fp32 scalar
        writer.add(f"{module}.weight.state2.absmax", state.state2.absmax)  # [n_absmax / 256] fp32
    writer.meta["quant_layers"][module] = {
        "shape": list(state.shape), "blocksize": state.blocksize, "quant_type": state.quant_type,
        "dtype": str(state.dtype).removeprefix("torch."),
        "state2_blocksize": state.state2.blocksize if state.nested else None}


def build_from_folder(folder: str | Path, compute_dtype: torch.dtype, num_layers: int | None = None) -> nn.Module:
    """The model whose every weight is a view of the offload folder's file (written by ``quantize_to_folder``).

    Only the small codebooks and the rotary buffers are on the heap; the frozen weights count as file-backed
    memory the kernel pages in and out. ``num_layers`` keeps only the first decoder layers (benchmarks use it
    to time a few layers of a large model). Raises ValueError if the folder is not a whole-model offload folder.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
    from bitsandbytes.functional import QuantState
    from transformers import AutoConfig

    folder = Path(folder)
    index = read_index(folder)
    if "config" not in index:
        raise ValueError(f"{folder}: holds only the 4-bit layers of a loaded model, not a whole model; "
                         "write it with quantize_to_folder")
    config = AutoConfig.for_model(**index["config"])
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    model = skeleton(config, compute_dtype)
    present = {name for name, _ in model.named_modules()}

    def view(key: str) -> torch.Tensor:
        return file_view(folder / DATA_NAME, index["tensors"][key])

    for name, q in index["quant_layers"].items():
        if name not in present:
            continue  # a decoder layer beyond num_layers
        parent, _, attr = name.rpartition(".")
        old = model.get_submodule(name)
        layer = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=q["state2_blocksize"] is not None,
                                  quant_type=q["quant_type"], device="meta")
        state2 = None
        if q["state2_blocksize"] is not None:
            state2 = QuantState(absmax=view(f"{name}.weight.state2.absmax"), code=bnbF.create_dynamic_map(),
                                blocksize=q["state2_blocksize"], dtype=torch.float32)
        state = QuantState(absmax=view(f"{name}.weight.absmax"), shape=torch.Size(q["shape"]),
                           code=bnbF.get_4bit_type(q["quant_type"], device="cpu"), blocksize=q["blocksize"],
                           quant_type=q["quant_type"], dtype=getattr(torch, q["dtype"]),
                           offset=view(f"{name}.weight.offset") if state2 is not None else None, state2=state2)
        layer.weight = bnb.nn.Params4bit(view(f"{name}.weight"), requires_grad=False, quant_state=state,
                                         blocksize=q["blocksize"], compress_statistics=state2 is not None,
                                         quant_type=q["quant_type"], module=layer, bnb_quantized=True)
        model.get_submodule(parent).register_module(attr, layer)
    for key in index["tensors"]:
        if key.split(".weight")[0] in index["quant_layers"]:
            continue  # a 4-bit layer's packed weight and quant state, placed above (its bias is not skipped)
        module_name, _, attr = key.rpartition(".")
        if module_name not in present:
            continue  # beyond num_layers
        owner = model.get_submodule(module_name)
        setattr(owner, attr, nn.Parameter(view(key), requires_grad=False))
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"{folder}: no weights for {left[:5]} ({len(left)} in all); write the folder again")
    return model
