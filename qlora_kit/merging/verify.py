"""Prove a merged export reproduces the adapter model: logits, greedy generations and eval losses.

One model is in memory at a time: first the 4-bit base + adapter (qlora-kit), whose logits and generations
are kept (a few MB), then the merged folder loaded with plain transformers in fp32. Peak memory is about
that of the merged model in fp32, not of both.
"""
from __future__ import annotations

import gc
import shutil
from pathlib import Path

import torch

from qlora_kit.dtypes import dtype_name
from qlora_kit.merging.plan import MergeError, MergePlan, build_plan
from qlora_kit.merging.write import write_model
from qlora_kit.progress import progress_bar

DEFAULT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Write a short poem about the sea.",
    "Q: What is 12 times 7?\nA:",
]
MAX_NEW_TOKENS = 16
EVAL_PROMPTS = 4  # records of --eval-file whose prompts are compared (instead of DEFAULT_PROMPTS)
# A dequantized merge exported in fp32 must agree with the adapter model to this fraction of the largest
# |logit| (fp32 summation order differs: merged W'x vs Wx + s·B(Ax)); beyond it the command fails.
FP32_RTOL = 1e-4
# bf16/fp16 exports are compared against this looser bound and only reported: rounding W' to 16 bit moves
# the logits by about 1e-3..1e-2 of their scale (FACTS: bf16 rounding swamps deltas under ~0.1% of W).
LOW_PRECISION_RTOL = 5e-2


class VerificationError(RuntimeError):
    """The merged model does not reproduce the 4-bit base + adapter within the stated tolerance."""


# ---------------------------------------------------------------------------------------------
# Running one model

@torch.no_grad()
def run_prompts(model, prompt_ids: list[torch.Tensor], pad_id: int, max_new_tokens: int, desc: str,
                progress: bool = False) -> dict:
    """Logits ``[T, V]`` for each prompt and its greedy continuation (token ids); a bar with ETA when ``progress``."""
    model.eval()
    logits, gens = [], []
    for ids in progress_bar(prompt_ids, desc=f"verify: {desc}", unit="prompt", enabled=progress):
        logits.append(model(input_ids=ids).logits[0].float())  # [T, V]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad_id,
                             use_cache=True)
        gens.append(out[0, ids.shape[1]:].tolist())
    return {"logits": logits, "generations": gens}


def reference_model(plan: MergePlan):
    """The 4-bit base + adapter exactly as training ran it, with fp32 compute.

    Its 4-bit weights are quantized from ``plan.loader_dtype``, the dtype training's loader cast the checkpoint
    to (the adapter's recorded compute dtype), as the merge does; the other weights are the checkpoint's.
    """
    from qlora_kit.model.adapters import load_adapter
    from qlora_kit.model.load import load_model
    from qlora_kit.model.lora import set_rank

    model, _ = load_model(plan.base, quant=plan.quant, compute_dtype="fp32", device="cpu")
    if plan.loader_dtype != torch.float32:
        quantize_from_loader_dtype(model, plan)
    vocab = plan.config.get("vocab_size")
    if vocab and vocab != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab)  # tokens added in training; the adapter's copies fill the rows
    load_adapter(model, plan.adapter_dir)
    set_rank(model, plan.rank)
    return model


def quantize_from_loader_dtype(model, plan: MergePlan) -> None:
    """Re-quantize each 4-bit layer of ``model`` (loaded in fp32) from its checkpoint weight cast to
    ``plan.loader_dtype``: the codes and scales training had. Raises MergeError for a layer not in the checkpoint."""
    from qlora_kit.merging.write import CheckpointReader
    from qlora_kit.model.quant import is_4bit, requantize_layer

    sources = {it.source.key: it.source for it in plan.items if it.source is not None}
    layers = [(name, m) for name, m in model.named_modules() if is_4bit(m)]
    read = CheckpointReader()
    try:
        for name, layer in layers:
            src = sources.get(f"{name}.weight")
            if src is None:
                raise MergeError(f"{plan.base}: no checkpoint tensor {name}.weight for the 4-bit layer {name}")
            requantize_layer(layer, read(src).to(plan.loader_dtype), plan.quant)  # [out, in]
    finally:
        read.close()


def plain_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, device_map={"": "cpu"},
                                                use_safetensors=True)


def free_model(model) -> None:
    del model
    gc.collect()


# ---------------------------------------------------------------------------------------------
# Comparing

def compare_runs(ref: dict, merged: dict) -> dict:
    """max/mean |Δlogit|, the same relative to max |reference logit|, and greedy agreement."""
    diffs = [(a - b).abs() for a, b in zip(ref["logits"], merged["logits"])]
    max_abs = max(d.max().item() for d in diffs)
    mean_abs = sum(d.sum().item() for d in diffs) / sum(d.numel() for d in diffs)
    scale = max(a.abs().max().item() for a in ref["logits"])
    pairs = list(zip(ref["generations"], merged["generations"]))
    same_tokens = sum(sum(x == y for x, y in zip(a, b)) for a, b in pairs)
    total_tokens = sum(max(len(a), len(b)) for a, b in pairs)
    finite = all(torch.isfinite(m).all().item() for m in merged["logits"])
    return {"max_abs_logit_diff": max_abs, "mean_abs_logit_diff": mean_abs, "logit_scale": scale,
            "max_rel_logit_diff": max_abs / max(scale, 1e-30), "finite": finite,
            "generations_identical": sum(a == b for a, b in pairs) / len(pairs),
            "generation_token_agreement": same_tokens / max(total_tokens, 1)}


def effect_retained(base: dict, ref: dict, merged: dict) -> float:
    """Projection of the merged model's logit shift on the adapter's: 1 = all of its effect, 0 = none."""
    num = den = 0.0
    for b, r, m in zip(base["logits"], ref["logits"], merged["logits"]):
        effect = r - b
        num += ((m - b) * effect).sum().item()
        den += effect.pow(2).sum().item()
    return num / den if den > 0 else 1.0


# ---------------------------------------------------------------------------------------------
# Eval loss

def read_eval_examples(path: str | Path, tokenizer) -> list:
    """The eval file's records tokenized and masked exactly as training does (``data.tokenize_example``)."""
    from qlora_kit.config import DataConfig
    from qlora_kit.data.formats import detect_format
    from qlora_kit.data.sources import load_records
    from qlora_kit.data.tokenize import tokenize_example

    records = load_records(path)
    cfg = DataConfig(max_seq_len=10**9)
    return [tokenize_example(r, detect_format(r, f"{path} record {i}"), tokenizer, cfg, f"{path} record {i}")
            for i, r in enumerate(records, 1)]


def eval_prompts(path: str | Path, tokenizer, limit: int = EVAL_PROMPTS) -> list[str]:
    """The first ``limit`` eval records' prompts, rendered by the prompt contract (the merged tokenizer's chat
    template) as training renders them: the text before each record's last reply."""
    from qlora_kit.config import DataConfig
    from qlora_kit.data.contract import prompt_contract
    from qlora_kit.data.formats import detect_format, render
    from qlora_kit.data.sources import load_records
    from qlora_kit.data.tokenize import to_text

    cfg, prompts = DataConfig(), []
    prompt_contract(tokenizer, cfg)
    for i, record in enumerate(load_records(path)[:limit], 1):
        where = f"{path} record {i}"
        text = to_text(render(record, detect_format(record, where), tokenizer, cfg, where), tokenizer, where)
        if text.templated and text.spans:
            prompts.append(text.text[: text.spans[-1][0]])
    return prompts


def eval_loss(model, examples: list, progress: bool = False) -> float:
    """Mean cross-entropy per supervised token over ``data.Example`` s, one sequence at a time (no padding)."""
    from qlora_kit.training.evaluate import evaluate_loss

    longest = max((len(e.input_ids) for e in examples), default=1)
    return evaluate_loss(model, examples, batch_size=1, pad_id=0, max_seq_len=longest, progress=progress)


def _other_merge_loss(plan: MergePlan, folder: Path, examples: list, progress: bool) -> tuple[str, float]:
    """Eval loss of the merge mode not exported, built in a scratch folder and deleted after."""
    other = "original" if plan.merge_base == "dequantized" else "dequantized"
    other_plan = build_plan(plan.base, plan.adapter_dir, other, dtype_name(plan.out_dtype), plan.rank)
    scratch = folder / f".{other}-merge"
    scratch.mkdir()
    try:
        write_model(other_plan, scratch, 2**62, progress)
        model = plain_model(scratch)
        loss = eval_loss(model, examples, progress)
        free_model(model)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return other, loss


# ---------------------------------------------------------------------------------------------
# The whole check

def verify_export(folder: Path, plan: MergePlan, prompts: list[str] | None = None, eval_file: str | Path | None = None,
                  strict: bool = True, progress: bool = True, max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """Compare the export in ``folder`` with the 4-bit base + adapter; return the report's verification part.

    The prompts are ``prompts``, else the first records of ``eval_file`` rendered by the prompt contract (the
    merged tokenizer's chat template), else ``DEFAULT_PROMPTS``.

    With ``strict``, raises VerificationError when a dequantized fp32 export's logits differ by more than
    ``FP32_RTOL`` of the logit scale, or when any logit is NaN/inf.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    rendered = not prompts and eval_file is not None and eval_prompts(eval_file, tokenizer)
    prompts = prompts or rendered or DEFAULT_PROMPTS  # rendered prompts carry the template's special tokens
    ids = [tokenizer(p, return_tensors="pt", add_special_tokens=not rendered).input_ids for p in prompts]  # [1, T]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    records = read_eval_examples(eval_file, tokenizer) if eval_file is not None else None
    result: dict = {"prompts": prompts, "max_new_tokens": max_new_tokens,
                    "memory": "one model at a time: the 4-bit base + adapter, then the merged model in fp32"}

    model = reference_model(plan)
    ref = run_prompts(model, ids, pad, max_new_tokens, "4-bit + adapter", progress)
    base = None
    if plan.requantize is not None:
        from qlora_kit.model.lora import adapters_disabled

        with adapters_disabled(model):
            base = run_prompts(model, ids, pad, 1, "4-bit base", progress)  # only its logits are used
    losses = {"4bit_plus_adapter": eval_loss(model, records, progress)} if records else {}
    free_model(model)

    model = plain_model(folder)
    merged = run_prompts(model, ids, pad, max_new_tokens, "merged", progress)
    if records:
        key = f"merged_{plan.merge_base}" + ("_requantized" if plan.requantize else "")
        losses[key] = eval_loss(model, records, progress)
    free_model(model)

    result.update(compare_runs(ref, merged))
    result["generations"] = {"adapter_4bit": [tokenizer.decode(g) for g in ref["generations"]],
                             "merged": [tokenizer.decode(g) for g in merged["generations"]]}
    if base is not None:
        result["logit_effect_retained"] = effect_retained(base, ref, merged)
    if records:
        other, loss = _other_merge_loss(plan, folder, records, progress)
        losses[f"merged_{other}"] = loss
        result["eval_loss"] = losses
        result["eval_records"] = len(records)
    _judge(result, plan, strict)
    return result


def _judge(result: dict, plan: MergePlan, strict: bool) -> None:
    """Set the tolerance and pass/fail fields; raise in strict mode for a dequantized fp32 mismatch."""
    exact = plan.merge_base == "dequantized" and plan.out_dtype == torch.float32 and plan.requantize is None
    if plan.requantize is not None:
        result["tolerance"] = None
        result["check"] = "re-quantized export: compared, not held to a tolerance"
    elif plan.merge_base == "original":
        result["tolerance"] = None
        result["check"] = "original merge: differs from the trained function by the quantization residual; reported only"
    else:
        result["tolerance"] = FP32_RTOL if exact else LOW_PRECISION_RTOL
        result["check"] = ("max |Δlogit| <= tolerance x max |logit| (fails the merge)" if exact else
                           "max |Δlogit| <= tolerance x max |logit| (16-bit export: reported, does not fail)")
    tol = result["tolerance"]
    result["passed"] = bool(result["finite"] and (tol is None or result["max_rel_logit_diff"] <= tol))
    if strict and (not result["finite"] or (exact and not result["passed"])):
        raise VerificationError(
            f"merged model does not reproduce the 4-bit base + adapter: max |Δlogit| = "
            f"{result['max_abs_logit_diff']:.3g} ({result['max_rel_logit_diff']:.3g} of the logit scale "
            f"{result['logit_scale']:.3g}; tolerance {tol}), finite={result['finite']}. Nothing was written. "
            "Check that --base is the checkpoint the adapter was trained on, or rerun with --no-verify to inspect.")
