"""Merge a LoRA adapter into its base and export a plain safetensors model: plan, choose the dtype, write, verify.

The steps live in their own modules and run here in order, inside ``atomic_dir`` (an interrupted export never
looks complete): ``plan.build_plan`` (headers only, every check before a byte is written), ``choose_auto_dtype``
(dtype "auto"), ``write.write_model`` (stream the merged tensors, ``weights.merged_tensor``, to shards),
``report.build_report`` and ``verify.verify_export`` (reload and compare with the 4-bit base + adapter).
Nothing imports this module back except the CLI, the public API and scripts.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qlora_kit.atomic import atomic_dir, atomic_write_json, check_replaceable
from qlora_kit.dtypes import lookup
from qlora_kit.merging.plan import MergeError, MergePlan, build_plan, with_dtype
from qlora_kit.merging.report import build_report
from qlora_kit.merging.verify import verify_export
from qlora_kit.merging.weights import CAST_ERROR_LIMIT, merged_tensor, weighted_mean
from qlora_kit.merging.write import (
    CheckpointReader,
    parse_size,
    requantize_folder,
    return_big_buffers_to_the_os,
    write_model,
)
from qlora_kit.paths import check_output_path

MERGE_OURS = ("merge_report.json",)  # every merge output holds it: --overwrite may replace only such a folder
REQUANTIZE_TYPES = ("nf4", "fp4")


def merge_and_export(base: str | Path, adapter: str | Path, out: str | Path, merge_base: str = "dequantized",
                     dtype: str = "auto", requantize: str | None = None, overwrite: bool = False,
                     verify: bool = True, prompts: list[str] | None = None, eval_file: str | Path | None = None,
                     shard_size: str | int = "2GB", rank: int | None = None, progress: bool = True) -> dict:
    """Merge ``adapter`` into ``base`` and write a plain safetensors model to ``out``; return the report.

    Args:
        base: the base checkpoint folder the adapter was trained on (16/32-bit safetensors).
        adapter: the adapter folder (PEFT format; a tokenizer saved beside it is used for added tokens).
        out: the output folder, written atomically (a temporary folder renamed at the end).
        merge_base: "dequantized" adds ΔW to dequant(quant(W)), the weight training saw; "original" to W.
        dtype: output dtype "bf16", "fp16" or "fp32"; "auto" (default): the checkpoint's, unless casting to it
            changes the merged weights by more than ``weights.CAST_ERROR_LIMIT`` x ||ΔW||, then fp32 (see
            ``choose_auto_dtype``); with ``requantize``, "auto" is the checkpoint's.
        requantize: "nf4" (or "fp4") also re-quantizes the merged model to 4-bit and saves that instead.
        overwrite: replace an existing ``out`` that is an earlier merge output (holds merge_report.json);
            anything else is never replaced (FileExistsError).
        verify: reload the output, compare logits and greedy generations with the 4-bit base + adapter, and
            fail when a dequantized fp32 merge is off by more than ``verify.FP32_RTOL``.
        prompts: the prompts verification runs (default: the first ``eval_file`` records in the trained
            prompt format, else ``verify.DEFAULT_PROMPTS``).
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
    if requantize not in (None, *REQUANTIZE_TYPES):
        raise MergeError(f"requantize={requantize!r}: use 'nf4' or 'fp4' (or leave it off for a 16/32-bit export)")
    if eval_file is not None and not Path(eval_file).is_file():
        raise MergeError(f"eval file {str(eval_file)!r}: no such file")
    limit = parse_size(shard_size)
    plan = build_plan(base, adapter, merge_base, None if dtype == "auto" else dtype, rank)
    if requantize:
        plan.requantize = dataclasses.replace(plan.quant, bits=4, quant_type=requantize)
    elif dtype == "auto":
        plan = choose_auto_dtype(plan, progress)
    start = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite, ours=MERGE_OURS, kind="merge") as tmp:
        written = _write(plan, tmp, limit, progress)
        report = build_report(plan, written, out, time.perf_counter() - start)
        if verify or eval_file is not None:
            report["verification"] = verify_export(tmp, plan, prompts, eval_file, strict=verify, progress=progress)
        report["total_seconds"] = round(time.perf_counter() - start, 2)
        atomic_write_json(tmp / "merge_report.json", report)
    return report


def choose_auto_dtype(plan: MergePlan, progress: bool = True) -> MergePlan:
    """dtype "auto": keep the checkpoint's dtype (``plan.out_dtype``) unless the cast would erase the adapter.

    Casts each adapted layer's merged fp32 weight to the checkpoint's dtype and measures
    ``cast_error_rel_to_delta`` = ||cast(W') - W'|| / ||ΔW||, the report's number, weighted by ||ΔW||² over
    layers. Above ``CAST_ERROR_LIMIT`` the plan switches to fp32 and says so in its notes. This merges the
    adapted layers once more before the write (nothing for an fp32 checkpoint). Returns the plan to write, with
    ``dtype_auto`` recording the choice.
    """
    checkpoint = plan.out_dtype
    cast = 0.0 if checkpoint == torch.float32 else weighted_mean(_adapted_layer_stats(plan, progress),
                                                                 "cast_error_rel_to_delta") or 0.0
    chosen = plan if cast <= CAST_ERROR_LIMIT else with_dtype(plan, torch.float32)
    name = lookup(checkpoint).long
    chosen.dtype_auto = {"checkpoint_dtype": name, "cast_error_rel_to_delta": cast, "limit": CAST_ERROR_LIMIT,
                         "chosen": lookup(chosen.out_dtype).long}
    if chosen is not plan:
        chosen.notes.append(
            f"dtype auto wrote float32, not the checkpoint's {name}: casting to {name} would change the merged "
            f"weights by {cast:.2f}x the adapter's delta (limit {CAST_ERROR_LIMIT}) and so lose part of the "
            f"fine-tune; the weights take {4 // checkpoint.itemsize}x the space. --dtype {lookup(checkpoint).name} "
            "writes the smaller, lossy export")
    return chosen


def _adapted_layer_stats(plan: MergePlan, progress: bool) -> dict[str, dict]:
    """adapter module -> ``merged_tensor``'s statistics in ``plan.out_dtype``, nothing written."""
    return_big_buffers_to_the_os()
    reader, layers = CheckpointReader(), {}
    adapted = [it for it in plan.items if it.module is not None]
    try:
        for item in tqdm(adapted, desc="dtype auto: measure the cast", unit="layer", disable=not progress):
            _, layers[item.module] = merged_tensor(item, plan, reader)
    finally:
        reader.close()
    return layers


def _write(plan: MergePlan, folder: Path, limit: int, progress: bool) -> dict:
    """The merged model into ``folder``; for a re-quantized export via a staging folder inside it."""
    if plan.requantize is None:
        return write_model(plan, folder, limit, progress)
    stage = folder / ".merged-unquantized"
    stage.mkdir()
    written = write_model(plan, stage, limit, progress)
    requantize_folder(stage, folder, plan.requantize, plan.out_dtype, limit)
    shutil.rmtree(stage)
    return written
