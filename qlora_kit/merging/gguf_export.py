"""Export to GGUF (llama.cpp, Ollama, LM Studio): merge on the way, stream tensor by tensor, verify by running it.

The flow is merge's: check everything from headers first (``merge.build_plan``, the architecture, every tensor's
GGUF name, the tokenizer), then stream. Each tensor is merged in fp32 by ``merge.merged_tensor`` (the same
dequantized/original choice and arithmetic as ``qlora-kit merge``), reordered for llama's rope where needed,
encoded by gguf's numpy code (F32/F16/BF16/Q8_0) and written at once with ``gguf.GGUFWriter``, so memory holds a
few tensors, never the model. Types gguf cannot encode (Q4_K_M, ...) are made from that file by llama.cpp's own
quantizer (llama-cpp-python). The file is written under a temporary name beside the target, verified
(``gguf_verify``), and renamed at the end; an Ollama Modelfile and ``<name>.export_report.json`` go beside it.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from qlora_kit.atomic import atomic_write_bytes, atomic_write_json
from qlora_kit.merging.gguf_map import (
    LLAMA_CPP_TYPES,
    GgufArch,
    GgufError,
    TensorOut,
    add_arch_metadata,
    check_quant,
    encode,
    gguf_arch,
    map_tensors,
    permute_qk,
)
from qlora_kit.merging.gguf_vocab import VocabInfo, add_tokenizer_metadata, load_tokenizer, modelfile_text
from qlora_kit.merging.plan import Item, MergePlan, build_plan, checkpoint_tensors
from qlora_kit.merging.weights import lora_delta, merged_tensor, weighted_mean
from qlora_kit.model.load import check_model_path
from qlora_kit.paths import check_output_path

_FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}  # llama_ftype of the streamed file


@dataclasses.dataclass
class ExportSource:
    """What is exported: a base + adapter merged on the way, or an already merged folder."""

    items: list[Item]  # every checkpoint tensor, produced in fp32 by merge.merged_tensor
    plan: MergePlan | None  # the merge plan (None for a merged folder)
    config: dict  # the output model's config.json
    tokenizer_dir: Path  # the adapter's tokenizer when saved beside it, else the base's
    inputs: list[Path]  # input folders, which the output must stay out of
    name: str  # general.name


def resolve_source(base=None, adapter=None, model=None, merge_base: str = "dequantized",
                   rank: int | None = None) -> ExportSource:
    """Read headers and check inputs (no weights): ``base`` + ``adapter``, or a merged ``model`` folder."""
    if model is not None and (base is not None or adapter is not None):
        raise GgufError("give either --model (a merged folder) or --base with --adapter, not both")
    if model is None and (base is None or adapter is None):
        raise GgufError("give --base and --adapter (merged on the way), or --model for an already merged folder")
    if model is not None:
        model = Path(model)
        config = check_model_path(model)
        items = [Item(s.key, s.shape, torch.float32 if s.dtype.is_floating_point else s.dtype, s)
                 for s in checkpoint_tensors(model).values()]
        return ExportSource(items, None, config, model, [model], model.name)
    plan = build_plan(base, adapter, merge_base, "fp32", rank)
    return ExportSource(plan.items, plan, plan.config, plan.tokenizer_dir, [plan.base, plan.adapter_dir],
                        f"{plan.base.name}+{plan.adapter_dir.name}")


def _require_llama_cpp(quant: str):
    try:
        import llama_cpp
    except ImportError:
        raise GgufError(f"--quant {quant} needs llama.cpp's quantizer: pip install 'qlora-kit[gguf]' (builds "
                        "llama-cpp-python), or export q8_0/f16 here and run llama-quantize yourself") from None
    return llama_cpp


def write_gguf(path: Path, src: ExportSource, arch: GgufArch, tensors: list[TensorOut], tok, quant: str,
               progress: bool = True) -> VocabInfo:
    """Stream the model into ``path``: metadata and tensor infos first, then each tensor as it is merged."""
    import gguf

    from qlora_kit.merging.write import CheckpointReader, return_big_buffers_to_the_os

    return_big_buffers_to_the_os()
    n_vocab = next(t.shape[0] for t in tensors if t.name == "token_embd.weight")
    writer = gguf.GGUFWriter(path, arch.name)
    writer.add_name(src.name)
    writer.add_file_type(_FILE_TYPES.get(quant, 1))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_arch_metadata(writer, src.config, n_vocab, arch)
    info = add_tokenizer_metadata(writer, tok, src.tokenizer_dir, n_vocab)
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    items, reader = {it.key: it for it in src.items}, CheckpointReader()
    try:
        for t in tqdm(tensors, desc="gguf", unit="tensor", disable=not progress):
            w, _ = merged_tensor(items[t.key], src.plan, reader)  # fp32 (merge.build_plan with dtype fp32)
            if t.permute_heads:
                w = permute_qk(w, t.permute_heads)
            if t.shift:
                w = w.float() + t.shift  # Gemma norms: llama.cpp multiplies by the stored value, HF by 1 + w
            writer.write_tensor_data(encode(w.float(), t.ggml_type, t.key))
        for f in writer.fout or []:
            f.flush()
            os.fsync(f.fileno())
    finally:
        reader.close()
        writer.close()
    return info


def quantize_with_llama_cpp(src: Path, dst: Path, quant: str) -> None:
    """llama.cpp's quantizer (``llama_model_quantize``) from the streamed F16 file to ``quant``."""
    llama_cpp = _require_llama_cpp(quant)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_CPP_TYPES[quant]
    params.nthread = max(1, min(2, os.cpu_count() or 1))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise GgufError(f"llama.cpp could not quantize {src.name} to {quant} (return code {rc})")


@torch.no_grad()
def weight_retention(path: Path, src: ExportSource, tensors: list[TensorOut]) -> dict:
    """Per adapted layer, how much of ΔW the stored (encoded/quantized) weight keeps.

    ``retained = <deq(stored) - W_base, ΔW> / ||ΔW||²`` (1: all of it, 0: none) and ``error = ||deq(stored) - W'||
    / ||ΔW||``, where W' = W_base + ΔW is the fp32 merge. Both sides use the same row order, which leaves both
    numbers unchanged. Reads the finished file back, so it measures llama.cpp's quantization too."""
    import gguf

    from qlora_kit.merging.write import CheckpointReader

    plan = src.plan
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    items, reader, layers = {it.key: it for it in src.items}, CheckpointReader(), {}
    try:
        for t in tensors:
            item = items[t.key]
            if item.module is None:
                continue
            a, b = plan.adapter.lora[item.module]
            merged, _ = merged_tensor(item, plan, reader)  # [out, in] fp32
            delta = lora_delta(a, b, plan.scale, plan.rank)  # [out, in]
            if t.permute_heads:
                merged, delta = permute_qk(merged, t.permute_heads), permute_qk(delta, t.permute_heads)
            s = stored[t.name]
            deq = torch.from_numpy(gguf.quants.dequantize(s.data, s.tensor_type).copy()).reshape(merged.shape)
            d2 = max(delta.pow(2).sum().item(), 1e-60)
            layers[item.module] = {"delta_norm": d2 ** 0.5, "stored_type": s.tensor_type.name,
                                   "weight_delta_retained": ((deq - merged + delta) * delta).sum().item() / d2,
                                   "error_rel_to_delta": (deq - merged).norm().item() / d2 ** 0.5}
    finally:
        reader.close()
    return layers


def _prepare(out: Path, src_args: dict, quant: str, overwrite: bool, eval_file) -> tuple:
    """Every check before work: arguments, output path, inputs, architecture, tensor names, tokenizer."""
    q = check_quant(quant)
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GgufError("GGUF export needs the gguf package: pip install 'qlora-kit[gguf]' (or pip install gguf)") from None
    if out.suffix != ".gguf":
        raise GgufError(f"--out {out}: name the file *.gguf")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if eval_file is not None and not Path(eval_file).is_file():
        raise GgufError(f"eval file {str(eval_file)!r}: no such file")
    if q in LLAMA_CPP_TYPES:
        _require_llama_cpp(q)
    src = resolve_source(**src_args)
    flags = ("--base", "--adapter") if src.plan is not None else ("--model",)
    check_output_path(out, {**dict(zip(flags, src.inputs)), "--eval-file": eval_file})
    where = str(src.inputs[0] / "config.json")
    arch = gguf_arch(src.config, where)
    tensors = map_tensors([(it.key, it.shape) for it in src.items], src.config, arch, q, where)
    tok = load_tokenizer(src.tokenizer_dir)
    return q, src, arch, tensors, tok


def export_gguf(out: str | Path, base: str | Path | None = None, adapter: str | Path | None = None,
                model: str | Path | None = None, quant: str = "q8_0", merge_base: str = "dequantized",
                rank: int | None = None, overwrite: bool = False, verify: bool = True,
                prompts: list[str] | None = None, eval_file: str | Path | None = None,
                eval_limit: int | None = None, progress: bool = True) -> dict:
    """Write a GGUF file for llama.cpp/Ollama from ``base`` + ``adapter`` (merged on the way) or a merged ``model``.

    Args:
        out: the ``.gguf`` file; an Ollama ``<stem>.Modelfile`` and ``<stem>.export_report.json`` go beside it.
        base, adapter: the base checkpoint and the adapter trained on it; or ``model``: a merged folder.
        quant: f32, f16, bf16, q8_0 (written here) or a llama.cpp type such as q4_k_m (needs llama-cpp-python).
        merge_base, rank: as for ``merge_and_export``.
        overwrite: replace an existing ``out`` (otherwise FileExistsError).
        verify: load the file with transformers' GGUF loader (and llama.cpp when installed) and compare logits and
            greedy generations with the 4-bit base + adapter (or the merged folder); fails on a mismatch beyond the
            type's tolerance for f32/f16/bf16/q8_0.
        prompts, eval_file, eval_limit: verification prompts; a JSONL in the trained format for eval loss and exact
            match (its first ``eval_limit`` records).
        progress: show progress bars.
    Returns:
        The report also written to ``<stem>.export_report.json``.
    Raises:
        GgufError (a ConfigError) for inputs that cannot be exported, before any work; FileExistsError;
        verify.VerificationError when the file does not reproduce the model (nothing is kept).
    """
    out = Path(out)
    src_args = dict(base=base, adapter=adapter, model=model, merge_base=merge_base, rank=rank)
    q, src, arch, tensors, tok = _prepare(out, src_args, quant, overwrite, eval_file)
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}.gguf")
    streamed = tmp.with_name(tmp.stem + "-f16.gguf") if q in LLAMA_CPP_TYPES else tmp
    try:
        info = write_gguf(streamed, src, arch, tensors, tok, q, progress)
        if streamed != tmp:
            quantize_with_llama_cpp(streamed, tmp, q)
            streamed.unlink()
        report = _report(out, tmp, src, arch, q, tensors, info, time.perf_counter() - start)
        if src.plan is not None:

            layers = weight_retention(tmp, src, tensors)
            report["weights"] = {"weight_delta_retained": weighted_mean(layers, "weight_delta_retained"),
                                 "error_rel_to_delta": weighted_mean(layers, "error_rel_to_delta"), "layers": layers}
        if verify or eval_file is not None:
            from qlora_kit.merging.gguf_verify import verify_gguf

            report["verification"] = verify_gguf(tmp, src, tok, info, q, prompts, eval_file, eval_limit,
                                                 strict=verify, progress=progress)
        report["total_seconds"] = round(time.perf_counter() - start, 2)
        atomic_write_bytes(out.with_suffix(".Modelfile"), modelfile_text(out.name, tok, info).encode("utf-8"))
        atomic_write_json(out.with_suffix(".export_report.json"), report)
        os.replace(tmp, out)  # last: the .gguf appears only when complete and verified
    finally:
        for p in (tmp, streamed):
            p.unlink(missing_ok=True)
    return report


def _report(out: Path, written: Path, src: ExportSource, arch: GgufArch, quant: str, tensors: list[TensorOut], info: VocabInfo,
            seconds: float) -> dict:
    """What was written: inputs, types, sizes and the tokenizer's contract."""
    plan = src.plan
    types: dict[str, int] = {}
    for t in tensors:
        types[t.ggml_type.name] = types.get(t.ggml_type.name, 0) + 1
    return {
        "out": str(out), "quant": quant, "architecture": arch.name, "inputs": [str(p) for p in src.inputs],
        "merge_base": plan.merge_base if plan else None, "rank": plan.rank if plan else None,
        "tensors": len(tensors), "streamed_types": types, "bytes": written.stat().st_size,
        "write_seconds": round(seconds, 2),
        "tokenizer": {"pre": info.pre, "tokens": info.n_tokens, "padded": info.n_padded, "special_ids": info.special,
                      "add_bos": info.add_bos, "add_eos": info.add_eos, "chat_template": info.chat_template is not None,
                      "stop": info.stop},
        "notes": list(plan.notes) if plan else [],
    }
