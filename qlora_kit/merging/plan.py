"""The merge plan: every output tensor, where it comes from and whether an adapter delta is added to it.

``build_plan`` reads only headers (checkpoint, adapter) and checks everything: every shard present, every
adapter module in the checkpoint with fitting shapes, a consistent vocabulary. It fails before any write.
The plan is plain data; ``weights`` computes each tensor of it, ``write`` streams it to disk.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from qlora_kit.config import ConfigError, QuantConfig
from qlora_kit.dtypes import DTYPES, lookup, parse_dtype
from qlora_kit.model.adapters import AdapterFile, read_adapter
from qlora_kit.model.load import check_model_path
from qlora_kit.model.remote_code import check_remote_code

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "prompt_contract.json")
MERGE_BASES = ("dequantized", "original")
# safetensors header names of the non-float dtypes (and F64) a checkpoint may hold; the float dtypes we write
# are in qlora_kit.dtypes
_OTHER_ST_DTYPES = {"F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                    "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_ST_BY_NAME = {**_OTHER_ST_DTYPES, **{d.safetensors: d.torch for d in DTYPES}}
_ST_BY_TORCH = {t: name for name, t in _ST_BY_NAME.items()}


class MergeError(ConfigError):
    """The merge cannot proceed (missing shard, adapter from another base, ...); nothing was written."""


def safetensors_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors header name (``"BF16"`` -> ``torch.bfloat16``)."""
    return _ST_BY_NAME[name]


def safetensors_name(dtype: torch.dtype) -> str:
    """The safetensors header name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    return _ST_BY_TORCH[dtype]


# ---------------------------------------------------------------------------------------------
# Reading the checkpoint and the architecture

@dataclasses.dataclass
class Source:
    """One tensor of the base checkpoint, known from its header only."""

    key: str  # tensor name in the checkpoint
    file: Path  # the shard holding it
    shape: tuple[int, ...]  # its shape
    dtype: torch.dtype  # its stored dtype


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
                sources[key] = Source(key, base / name, tuple(s.get_shape()), safetensors_dtype(s.get_dtype()))
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
# The plan

@dataclasses.dataclass
class Item:
    """One output tensor."""

    key: str  # tensor name in the output
    shape: tuple[int, ...]  # output shape
    dtype: torch.dtype  # output dtype
    source: Source | None  # the checkpoint tensor it starts from (None: a modules_to_save copy)
    copy: torch.Tensor | None = None  # a modules_to_save tensor that replaces the base tensor
    module: str | None = None  # the adapter module whose delta is added
    roundtrip: bool = False  # dequant(quant(W)) first (dequantized mode, a layer the loader quantizes)

    @property
    def nbytes(self) -> int:
        """Bytes of the output tensor."""
        return math.prod(self.shape) * (1 if self.dtype == torch.bool else self.dtype.itemsize)


@dataclasses.dataclass
class MergePlan:
    """Everything ``write.write_model`` needs, checked before anything is written."""

    base: Path  # the base checkpoint folder
    adapter_dir: Path  # the adapter folder
    adapter: AdapterFile  # the adapter's tensors and config
    quant: QuantConfig  # the quantization the adapter was trained against
    loader_dtype: torch.dtype  # dtype the weights had when the loader quantized them
    merge_base: str  # "dequantized" or "original" (MERGE_BASES)
    out_dtype: torch.dtype  # dtype of the output's floating tensors
    rank: int  # components merged
    scale: float  # alpha / rank (alpha / sqrt(rank) with rsLoRA)
    items: list[Item]  # every output tensor in file order
    config: dict  # the output config.json
    tokenizer_dir: Path  # where the tokenizer files are copied from
    notes: list[str]  # decisions taken for the user, for the report
    requantize: QuantConfig | None = None  # set for --requantize: measure how much of each delta survives it
    dtype_auto: dict | None = None  # how dtype "auto" chose out_dtype (pipeline.choose_auto_dtype), for the report


def lora_scale(adapter: AdapterFile, rank: int) -> float:
    """The LoRA scale at ``rank``: the rule of ``LoraAdapter.scale`` (alpha/rank, alpha/sqrt(rank) with rsLoRA)."""
    c = adapter.config
    return float(c.alpha) / (math.sqrt(rank) if c.use_rslora else rank)


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def _checkpoint_dtype(sources: dict[str, Source], lora_keys: list[str]) -> torch.dtype:
    """The checkpoint's dtype: that of its adapted weights, else of its first floating tensor."""
    for key in lora_keys + list(sources):
        if key in sources and sources[key].dtype.is_floating_point:
            return sources[key].dtype
    return torch.float32


def _loader_dtype(meta: dict) -> torch.dtype:
    """The compute dtype the adapter recorded (the dtype the loader quantized from); fp32 when not recorded."""
    try:
        return parse_dtype(meta.get("compute_dtype") or "fp32")
    except ValueError:
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


def _check_args(merge_base: str, dtype: str | None) -> None:
    if merge_base not in MERGE_BASES:
        raise MergeError(f"merge_base={merge_base!r}: use 'dequantized' (reproduces training) or 'original'")
    if dtype is not None:
        try:
            lookup(dtype)
        except ValueError as e:
            raise MergeError(f"dtype={dtype!r}: {e}") from None


def build_plan(base: str | Path, adapter: str | Path, merge_base: str = "dequantized", dtype: str | None = None,
               rank: int | None = None) -> MergePlan:
    """Read headers, check that the adapter fits the base, and list every output tensor. Writes nothing.

    ``dtype`` ("bf16", "fp16", "fp32"; None: the checkpoint's) is the output dtype of the floating tensors.
    Raises MergeError (a ConfigError) naming the file or module and the fix.
    """
    base, adapter_dir = Path(base), Path(adapter)
    _check_args(merge_base, dtype)
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
    out_dtype = parse_dtype(dtype) if dtype else _checkpoint_dtype(sources, sorted(lora_keys))
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
    tokenizer_dir = adapter_dir if _has_tokenizer(adapter_dir) else base
    check_remote_code(tokenizer_dir)  # the merged folder gets this tokenizer; base's was checked above
    if vocab != config.get("vocab_size", vocab) and tokenizer_dir == base:
        raise MergeError(f"{adapter_dir}: the adapter resizes the vocabulary to {vocab} but its folder has no tokenizer "
                         "files; save the tokenizer with the added tokens beside the adapter")
    k = rank or r
    return MergePlan(base, adapter_dir, ad, quant, _loader_dtype(ad.meta), merge_base, out_dtype, k,
                     lora_scale(ad, k), items, _output_config(config, out_dtype, untie, vocab), tokenizer_dir, notes)


def with_dtype(plan: MergePlan, dtype: torch.dtype) -> MergePlan:
    """The same plan with its floating tensors (and config.json's dtype) in ``dtype``."""
    items = [dataclasses.replace(it, dtype=dtype) if it.dtype.is_floating_point else it for it in plan.items]
    return dataclasses.replace(plan, out_dtype=dtype, items=items, config=_config_dtype(plan.config, dtype),
                               notes=list(plan.notes))


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
    out = _config_dtype({k: v for k, v in config.items() if k != "quantization_config"}, out_dtype)
    if untie:
        out["tie_word_embeddings"] = False
        if isinstance(out.get("text_config"), dict):
            out["text_config"]["tie_word_embeddings"] = False
    if vocab is not None and "vocab_size" in out:
        out["vocab_size"] = vocab
    return out


def _config_dtype(config: dict, dtype: torch.dtype) -> dict:
    """``config`` with its dtype fields set to ``dtype`` in transformers' spelling ("bfloat16")."""
    out = {**config, "dtype": lookup(dtype).long}
    if "torch_dtype" in out:
        out["torch_dtype"] = lookup(dtype).long
    return out
