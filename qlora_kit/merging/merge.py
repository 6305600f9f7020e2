"""Merge a LoRA adapter into its base and stream out a plain safetensors model.

``W' = W_base + scale * B @ A`` in fp32, then cast. ``W_base`` is ``dequant(quant(W))`` with the quantization
the adapter was trained against (``merge_base="dequantized"``, the default: it reproduces the trained
function) or the checkpoint's own ``W`` (``"original"``). The flow is plan, then write:

- ``build_plan`` reads only headers (checkpoint, adapter) and checks everything: every shard present, every
  adapter module in the checkpoint with fitting shapes, a consistent vocabulary. It fails before any write.
- ``write_model`` walks the checkpoint shard by shard, tensor by tensor, and writes each output tensor
  straight into its output shard (the safetensors header is computed from the plan up front), so memory
  holds a few tensors plus the pages of the input shard being read, never the model.

``merge_and_export`` runs both inside ``atomic_dir`` and then verifies the result (``verify.py``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open

from qlora_kit.model.adapters import AdapterFile, read_adapter
from qlora_kit.atomic import atomic_dir, atomic_write_json, check_replaceable
from qlora_kit.config import ConfigError, QuantConfig
from qlora_kit.model.load import check_model_path
from qlora_kit.paths import check_output_path
from qlora_kit.model.quant import quantize_roundtrip
from qlora_kit.model.remote_code import check_remote_code

log = logging.getLogger("qlora_kit")

INDEX_FILE = "model.safetensors.index.json"
MERGE_OURS = ("merge_report.json",)  # every merge output holds it: --overwrite may replace only such a folder
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
OUT_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
              "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class MergeError(ConfigError):
    """The merge cannot proceed (missing shard, adapter from another base, ...); nothing was written."""


def parse_size(size: str | int) -> int:
    """Bytes in ``"2GB"``, ``"500MB"``, ``"64KiB"`` or a plain integer. Raises MergeError when unreadable."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise MergeError(f"shard size {size!r}: use a number of bytes or e.g. '2GB', '500MB'")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


# ---------------------------------------------------------------------------------------------
# Reading the checkpoint and the architecture

@dataclasses.dataclass
class Source:
    """One tensor of the base checkpoint, known from its header only."""

    key: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


def checkpoint_tensors(base: Path) -> dict[str, Source]:
    """Every tensor of the checkpoint at ``base`` in file order, from headers only.

    Raises MergeError when the index lists a shard that is not there.
    """
    index = base / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (base / f).is_file()]
        if missing:
            raise MergeError(f"{index} lists {len(missing)} shard(s) that are not in {base}: {', '.join(missing[:3])} "
                             "(re-download or re-convert the base checkpoint)")
    else:
        files = sorted(p.name for p in base.glob("*.safetensors"))
    sources: dict[str, Source] = {}
    for name in files:
        with safe_open(str(base / name), "pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                sources[key] = Source(key, base / name, tuple(s.get_shape()), _ST_DTYPES[s.get_dtype()])
    return sources


@dataclasses.dataclass
class Arch:
    """What the merge needs to know about the model class, from an empty (meta-device) instance."""

    quantized: set[str]  # modules the 4-bit loader quantizes (their weights are round-tripped in dequantized mode)
    embed: str | None  # input embedding module, e.g. "model.embed_tokens"
    head: str | None  # output embedding module, e.g. "lm_head"
    tied: bool  # the config ties the head to the embeddings


def inspect_architecture(base: Path) -> Arch:
    """Build the model on the meta device (no memory) and ask transformers which linears it would quantize."""
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = {id(m): n for n, m in model.named_modules()}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    try:
        from transformers.quantizers.base import HfQuantizer
        from transformers.quantizers.quantizers_utils import should_convert_module

        skip = HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
    except ImportError:  # older transformers: the head is the one linear it keeps
        skip, should_convert_module = [names.get(id(head), "lm_head")], lambda n, p: n not in p
    quantized = {n for n, m in model.named_modules() if type(m) is nn.Linear and should_convert_module(n, skip)}
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    return Arch(quantized, names.get(id(embed)), names.get(id(head)) if head is not None else None, tied)


# ---------------------------------------------------------------------------------------------
# The plan: every output tensor, where it comes from and what is added to it

@dataclasses.dataclass
class Item:
    """One output tensor."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: Source | None  # the checkpoint tensor it starts from (None: a modules_to_save copy)
    copy: torch.Tensor | None = None  # a modules_to_save tensor that replaces the base tensor
    module: str | None = None  # the adapter module whose delta is added
    roundtrip: bool = False  # dequant(quant(W)) first (dequantized mode, a layer the loader quantizes)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (1 if self.dtype == torch.bool else self.dtype.itemsize)


@dataclasses.dataclass
class MergePlan:
    """Everything ``write_model`` needs, checked before anything is written."""

    base: Path
    adapter_dir: Path
    adapter: AdapterFile
    quant: QuantConfig  # the quantization the adapter was trained against
    loader_dtype: torch.dtype  # dtype the weights had when the loader quantized them
    merge_base: str
    out_dtype: torch.dtype
    rank: int  # components merged
    scale: float  # alpha / rank (alpha / sqrt(rank) with rsLoRA)
    items: list[Item]
    config: dict  # the output config.json
    tokenizer_dir: Path  # where the tokenizer files are copied from
    notes: list[str]
    requantize: QuantConfig | None = None  # set for --requantize: measure how much of each delta survives it


def _scale(adapter: AdapterFile, rank: int) -> float:
    """The LoRA scale at ``rank``: the rule of ``LoraAdapter.scale``."""
    c = adapter.config
    return float(c.alpha) / (math.sqrt(rank) if c.use_rslora else rank)


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def _default_dtype(sources: dict[str, Source], lora_keys: list[str]) -> torch.dtype:
    """The checkpoint's dtype: that of its adapted weights, else of its first floating tensor."""
    for key in lora_keys + list(sources):
        if key in sources and sources[key].dtype.is_floating_point:
            return sources[key].dtype
    return torch.float32


def _lora_items(adapter: AdapterFile, sources: dict[str, Source], where: Path) -> dict[str, str]:
    """checkpoint key -> adapter module, checking each module is in the checkpoint with fitting shapes."""
    keys, missing, wrong = {}, [], []
    for module, (a, b) in sorted(adapter.lora.items()):
        key = f"{module}.weight"
        src = sources.get(key)
        if src is None:
            missing.append(module)
        elif len(src.shape) != 2 or (b.shape[0], a.shape[1]) != src.shape or a.shape[0] != b.shape[1]:
            wrong.append(f"{module}: adapter A{tuple(a.shape)} B{tuple(b.shape)} vs base weight {list(src.shape)}")
        else:
            keys[key] = module
    if missing or wrong:
        parts = ([f"modules not in the base checkpoint: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"]
                 if missing else []) + wrong[:5]
        raise MergeError(f"{where}: adapter does not fit this base model (was it trained on another model? "
                         f"give the --base it was trained on); " + "; ".join(parts))
    return keys


def _copy_tensors(adapter: AdapterFile, sources: dict[str, Source], arch: Arch, where: Path) -> dict[str, torch.Tensor]:
    """checkpoint key -> modules_to_save tensor; a shape may differ only in the vocabulary rows of embed/head."""
    out, errors = {}, []
    vocab_keys = {f"{m}.weight" for m in (arch.embed, arch.head) if m}
    for module, params in adapter.copies.items():
        for pname, t in params.items():
            key = f"{module}.{pname}"
            src = sources.get(key)
            if src is None and not (arch.tied and arch.head and key == f"{arch.head}.weight"):
                errors.append(f"{key}: not in the base checkpoint")
            elif src is not None and tuple(t.shape) != src.shape and not (key in vocab_keys and tuple(t.shape[1:]) == src.shape[1:]):
                errors.append(f"{key}: adapter {tuple(t.shape)} vs base {list(src.shape)}")
            else:
                out[key] = t
    if errors:
        raise MergeError(f"{where}: modules_to_save copies do not fit this base model: {'; '.join(errors[:5])}")
    return out


def _head_items(arch: Arch, sources, lora_keys, copies) -> tuple[bool, str | None]:
    """(untie, key of an lm_head tensor to add): untie a tied pair when only one side was trained."""
    if not (arch.tied and arch.embed and arch.head):
        return False, None
    ek, hk = f"{arch.embed}.weight", f"{arch.head}.weight"
    changed = any(k in lora_keys or k in copies for k in (ek, hk))
    if not changed:
        return False, None
    return True, (hk if hk not in sources else None)


def build_plan(base: str | Path, adapter: str | Path, merge_base: str = "dequantized", dtype: str | None = None,
               rank: int | None = None) -> MergePlan:
    """Read headers, check that the adapter fits the base, and list every output tensor. Writes nothing.

    Raises MergeError (a ConfigError) naming the file or module and the fix.
    """
    base, adapter_dir = Path(base), Path(adapter)
    if merge_base not in ("dequantized", "original"):
        raise MergeError(f"merge_base={merge_base!r}: use 'dequantized' (reproduces training) or 'original'")
    if dtype is not None and dtype not in OUT_DTYPES:
        raise MergeError(f"dtype={dtype!r}: use one of bf16, fp16, fp32")
    config = check_model_path(base)
    sources = checkpoint_tensors(base)
    ad = read_adapter(adapter_dir)
    notes: list[str] = []
    r = ad.config.r
    if rank is not None and not 1 <= rank <= r:
        raise MergeError(f"rank={rank}: must be in [1, {r}] for {adapter_dir} (its rank is {r})")
    quant = ad.quant
    if quant is None:
        quant = QuantConfig()
        notes.append("the adapter records no quantization (saved by PEFT?); assumed NF4, double quant, block 64")
    arch = inspect_architecture(base)
    lora_keys = _lora_items(ad, sources, adapter_dir)
    copies = _copy_tensors(ad, sources, arch, adapter_dir)
    out_dtype = OUT_DTYPES[dtype] if dtype else _default_dtype(sources, sorted(lora_keys))
    untie, extra_head = _head_items(arch, sources, lora_keys, copies)
    roundtrip = merge_base == "dequantized" and quant.bits < 16
    items = []
    for key, src in sources.items():
        items.append(_item(key, src, out_dtype, copies, lora_keys, roundtrip and key.removesuffix(".weight") in arch.quantized))
        if extra_head and key == f"{arch.embed}.weight":  # the head the tied model used, written explicitly
            items.append(_item(extra_head, src, out_dtype, copies, lora_keys, False))
    if untie:
        notes.append(f"tied embeddings untied: only one of {arch.embed} / {arch.head} was trained, so both are written "
                     "and tie_word_embeddings is false")
    vocab = _check_vocab(items, arch, adapter_dir)
    out_config = _output_config(config, out_dtype, untie, vocab)
    tokenizer_dir = adapter_dir if _has_tokenizer(adapter_dir) else base
    check_remote_code(tokenizer_dir)  # the merged folder gets this tokenizer; base's was checked above
    if vocab != config.get("vocab_size", vocab) and tokenizer_dir == base:
        raise MergeError(f"{adapter_dir}: the adapter resizes the vocabulary to {vocab} but its folder has no tokenizer "
                         "files; save the tokenizer with the added tokens beside the adapter")
    k = rank or r
    loader = str(ad.meta.get("compute_dtype") or "float32")
    return MergePlan(base, adapter_dir, ad, quant, getattr(torch, loader, torch.float32), merge_base, out_dtype, k,
                     _scale(ad, k), items, out_config, tokenizer_dir, notes)


def _item(key, src, out_dtype, copies, lora_keys, roundtrip) -> Item:
    copy = copies.get(key)
    shape = tuple(copy.shape) if copy is not None else src.shape
    dtype = out_dtype if src.dtype.is_floating_point else src.dtype
    return Item(key, shape, dtype, None if copy is not None else src, copy, lora_keys.get(key),
                roundtrip and copy is None)


def _check_vocab(items: list[Item], arch: Arch, where: Path) -> int | None:
    """The output vocabulary size; the embeddings and the head must agree on it."""
    rows = {it.key: it.shape[0] for it in items if it.key in {f"{arch.embed}.weight", f"{arch.head}.weight"}}
    if len(set(rows.values())) > 1:
        raise MergeError(f"{where}: the adapter's embeddings and head disagree on the vocabulary size ({rows}); "
                         "after adding tokens put both embed_tokens and lm_head in modules_to_save")
    return next(iter(rows.values()), None)


def _output_config(config: dict, out_dtype: torch.dtype, untie: bool, vocab: int | None) -> dict:
    """config.json for the merged model: no quantization_config, the output dtype, untied/resized as merged."""
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    out["dtype"] = _DTYPE_NAMES[out_dtype]
    if "torch_dtype" in out:
        out["torch_dtype"] = _DTYPE_NAMES[out_dtype]
    if untie:
        out["tie_word_embeddings"] = False
        if isinstance(out.get("text_config"), dict):
            out["text_config"]["tie_word_embeddings"] = False
    if vocab is not None and "vocab_size" in out:
        out["vocab_size"] = vocab
    return out


# ---------------------------------------------------------------------------------------------
# Computing one merged tensor

def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float, rank: int) -> torch.Tensor:
    """``scale * B[:, :rank] @ A[:rank]`` in fp32: ``[out, in]``."""
    return (b[:, :rank].float() @ a[:rank].float()) * scale  # [out, k] @ [k, in]


def merged_tensor(item: Item, plan: MergePlan, read) -> tuple[torch.Tensor, dict | None]:
    """The output tensor for ``item`` (already cast) and, for adapted layers, its per-layer statistics.

    ``read(source)`` returns the checkpoint tensor. Works in place on one fp32 buffer so that a merge holds
    about three copies of the largest tensor at a time. Raises MergeError on a NaN or inf result.
    """
    w = item.copy if item.copy is not None else read(item.source)
    if not w.is_floating_point():
        return w, None
    if item.module is None and not item.roundtrip:
        return w.to(item.dtype), None
    w_norm = torch.linalg.vector_norm(w, dtype=torch.float32).item()
    merged = _base_weight(w, item.roundtrip, plan, fresh=w is item.copy)  # [out, in] fp32, ours to modify
    base_deq = None
    if item.module is not None and plan.requantize is not None:  # the weight training saw, for survival stats
        base_deq = merged.clone() if item.roundtrip else quantize_roundtrip(w.to(plan.loader_dtype), plan.quant)
    del w
    if item.module is not None:
        a, b = plan.adapter.lora[item.module]
        k = plan.rank
        merged.addmm_(b[:, :k].float(), a[:k].float(), alpha=plan.scale)  # += scale · [out, k] @ [k, in]
    if not torch.isfinite(merged).all():
        raise MergeError(f"{item.module or item.key}: the merged weight has NaN or inf values (check the adapter "
                         f"{plan.adapter_dir} for NaN/inf, e.g. a diverged training run)")
    out = merged.to(item.dtype)
    stats = _layer_stats(item, w_norm, merged, out, base_deq, plan) if item.module is not None else None
    return out, stats


def _base_weight(w: torch.Tensor, roundtrip: bool, plan: MergePlan, fresh: bool) -> torch.Tensor:
    """The fp32 weight the adapter is added to: dequant(quant(W)) as the loader built it, or W.

    ``fresh`` forces a copy when ``w`` must not be modified (an adapter tensor)."""
    if roundtrip:
        return quantize_roundtrip(w.to(plan.loader_dtype), plan.quant)  # [out, in], a new tensor
    return w.to(torch.float32, copy=fresh)


def delta_norm(a: torch.Tensor, b: torch.Tensor, scale: float, rank: int) -> float:
    """||scale · B[:, :rank] @ A[:rank]||_F from the factors: scale·sqrt(sum((BᵀB) ⊙ (AAᵀ))), no [out, in] matrix."""
    a, b = a[:rank].double(), b[:, :rank].double()  # [k, in], [out, k]
    return abs(scale) * ((b.t() @ b) * (a @ a.t())).sum().clamp_min(0).sqrt().item()


def _layer_stats(item: Item, w_norm: float, merged: torch.Tensor, out: torch.Tensor, base_deq, plan: MergePlan) -> dict:
    """Whether the delta survives: ||ΔW||/||W||, the output cast's error and (re-quantizing) the 4-bit one, relative to ||ΔW||.

    May overwrite ``merged`` (it is no longer needed once ``out`` exists)."""
    a, b = plan.adapter.lora[item.module]
    d = max(delta_norm(a, b, plan.scale, plan.rank), 1e-30)
    cast = 0.0 if out.dtype == torch.float32 else merged.sub_(out.float()).norm().item() / d
    stats = {"delta_norm": d, "delta_rel_to_weight": d / max(w_norm, 1e-30), "cast_error_rel_to_delta": cast}
    if base_deq is not None:
        delta = lora_delta(a, b, plan.scale, plan.rank)  # [out, in]
        shift = quantize_roundtrip(out, plan.requantize).sub_(base_deq)  # what re-quantizing keeps of ΔW
        stats["requant_retained"] = (shift * delta).sum().item() / (d * d)
        stats["requant_error_rel_to_delta"] = shift.sub_(delta).norm().item() / d
    return stats

# ---------------------------------------------------------------------------------------------
# The public entry point

def merge_and_export(base: str | Path, adapter: str | Path, out: str | Path, merge_base: str = "dequantized",
                     dtype: str | None = None, requantize: str | None = None, overwrite: bool = False,
                     verify: bool = True, prompts: list[str] | None = None, eval_file: str | Path | None = None,
                     shard_size: str | int = "2GB", rank: int | None = None, progress: bool = True) -> dict:
    """Merge ``adapter`` into ``base`` and write a plain safetensors model to ``out``; return the report.

    Args:
        base: the base checkpoint folder the adapter was trained on (16/32-bit safetensors).
        adapter: the adapter folder (PEFT format; a tokenizer saved beside it is used for added tokens).
        out: the output folder, written atomically (a temporary folder renamed at the end).
        merge_base: "dequantized" adds ΔW to dequant(quant(W)), the weight training saw; "original" to W.
        dtype: output dtype "bf16", "fp16" or "fp32"; default: the checkpoint's.
        requantize: "nf4" (or "fp4") also re-quantizes the merged model to 4-bit and saves that instead.
        overwrite: replace an existing ``out`` that is an earlier merge output (holds merge_report.json);
            anything else is never replaced (FileExistsError).
        verify: reload the output, compare logits and greedy generations with the 4-bit base + adapter, and
            fail when a dequantized fp32 merge is off by more than ``verify.FP32_RTOL``.
        prompts: the prompts verification runs (default: ``verify.DEFAULT_PROMPTS``).
        eval_file: JSONL records; reports eval loss of 4-bit + adapter and of both merges.
        shard_size: the largest output shard, e.g. "2GB".
        rank: merge only the first ``rank`` components (dynamic-rank adapters), scaled for that rank.
        progress: show progress bars.
    Returns:
        The report also written to ``out/merge_report.json``.
    Raises:
        MergeError (a ConfigError) for inputs that do not fit, before anything is written; paths.OutputPathError
        (a ConfigError) for an ``out`` that is, contains or lies inside an input; FileExistsError;
        verify.VerificationError when the merged model does not reproduce the adapter model (nothing is kept).
    """
    out = Path(out)
    check_output_path(out, {"--base": base, "--adapter": adapter, "--eval-file": eval_file})
    check_replaceable(out, overwrite, MERGE_OURS, "merge")
    if requantize not in (None, "nf4", "fp4"):
        raise MergeError(f"requantize={requantize!r}: use 'nf4' or 'fp4' (or leave it off for a 16/32-bit export)")
    if eval_file is not None and not Path(eval_file).is_file():
        raise MergeError(f"eval file {str(eval_file)!r}: no such file")
    limit = parse_size(shard_size)
    plan = build_plan(base, adapter, merge_base, dtype, rank)
    if requantize:
        plan.requantize = dataclasses.replace(plan.quant, bits=4, quant_type=requantize)
    start = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite, ours=MERGE_OURS, kind="merge") as tmp:
        written = _write(plan, tmp, limit, progress)
        from qlora_kit.merging.verify import build_report, verify_export

        report = build_report(plan, written, out, time.perf_counter() - start)
        if verify or eval_file is not None:
            report["verification"] = verify_export(tmp, plan, prompts, eval_file, strict=verify, progress=progress)
        report["total_seconds"] = round(time.perf_counter() - start, 2)
        atomic_write_json(tmp / "merge_report.json", report)
    return report


def _write(plan: MergePlan, folder: Path, limit: int, progress: bool) -> dict:
    """The merged model into ``folder``; for a re-quantized export via a staging folder inside it."""
    from qlora_kit.merging.write import requantize_folder, write_model

    if plan.requantize is None:
        return write_model(plan, folder, limit, progress)
    stage = folder / ".merged-unquantized"
    stage.mkdir()
    written = write_model(plan, stage, limit, progress)
    requantize_folder(stage, folder, plan.requantize, plan.out_dtype, limit)
    shutil.rmtree(stage)
    return written
