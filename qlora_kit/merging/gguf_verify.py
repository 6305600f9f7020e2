"""Prove a GGUF reproduces the model by running it: transformers' GGUF loader and, when installed, llama.cpp.

The reference is the 4-bit base + adapter exactly as trained (or the merged folder for ``--model``). One model
is in memory at a time; only logits and token ids of a few prompts are kept between them (``verify``'s helpers).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qlora_kit.merging.verify import (
    DEFAULT_PROMPTS,
    FP32_RTOL,
    MAX_NEW_TOKENS,
    VerificationError,
    compare_runs,
    effect_retained,
    eval_loss,
    free_model,
    plain_model,
    read_eval_examples,
    reference_model,
    run_prompts,
)
from qlora_kit.progress import progress_bar

# max |Δlogit| / max |logit| allowed for the file read back by transformers (dequantized to fp32), against the
# 4-bit base + adapter, per stored type: rounding the merged weights moves the logits. Measured on the tests'
# tiny random Llama (small logits, the worst case): f32 4.8e-7, f16 3.6e-4, bf16 3.0e-3, q8_0 1.1e-2 on the
# verification prompts and 2.5e-2 on random ids. A wrong tensor layout gives O(1). llama.cpp types: reported only.
TOLERANCES = {"f32": FP32_RTOL, "f16": 2e-3, "bf16": 2e-2, "q8_0": 5e-2}
# Below this share of the adapter's logit effect the report says plainly that the adapter is lost.
LOST_BELOW = 0.5


def _span(ex) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the tokens before the first supervised one, and that supervised run."""
    sup = [i for i, y in enumerate(ex.labels) if y != -100]
    start = sup[0]
    end = start
    while end < len(ex.labels) and ex.labels[end] != -100:
        end += 1
    return ex.input_ids[:start], ex.input_ids[start:end]


@torch.no_grad()
def _hf_exact_match(model, examples: list, progress: bool = False) -> float:
    """Share of examples whose greedy continuation reproduces the supervised tokens exactly."""
    from qlora_kit.model.fused import dequantized_weights

    hits = 0
    with dequantized_weights(model):  # a 4-bit reference dequantizes each weight once, not once per token
        for ex in progress_bar(examples, desc="verify: exact match", unit="example", enabled=progress):
            prompt, answer = _span(ex)
            ids = torch.tensor([prompt])  # [1, T]
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(answer),
                                 do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)
            hits += out[0, len(prompt):].tolist() == answer
    return hits / max(len(examples), 1)


def _evaluate(model, examples: list | None, progress: bool = False) -> dict:
    if not examples:
        return {}
    return {"eval_loss": eval_loss(model, examples, progress), "exact_match": _hf_exact_match(model, examples, progress)}


# Config fields transformers' GGUF loader does not read (it takes its config class's defaults); llama.cpp reads the
# soft-capping keys and fixes the query scale by architecture (gguf_map.gemma_checks).
LOADER_UNREAD = ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping")


def _transformers_gguf(path: Path, source_config: dict):
    """The file loaded by transformers' GGUF loader (dequantized, fp32), and the config fields it does not read
    that were taken from the source config (those whose default differs)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    overlaid = [k for k in LOADER_UNREAD if hasattr(config, k) and k in source_config
                and getattr(config, k) != source_config[k]]
    for k in overlaid:
        setattr(config, k, source_config[k])
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, config=config,
                                                 dtype=torch.float32, device_map={"": "cpu"})
    return model, overlaid


def _tokenizer_agreement(path: Path, tok, prompts: list[str]) -> float:
    """Share of prompts that the tokenizer rebuilt from the file (transformers) encodes to the same ids."""
    from transformers import AutoTokenizer

    rebuilt = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return sum(rebuilt(p).input_ids == tok(p).input_ids for p in prompts) / len(prompts)


def _llama_cpp_run(path: Path, ids: list[list[int]], max_new: int, examples: list | None, n_ctx: int,
                   progress: bool = False) -> dict:
    """llama.cpp itself: logits of each prompt, greedy continuations, and exact match on the examples."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=max(1, min(2, torch.get_num_threads())),
                logits_all=True, verbose=False)
    eos = llm.token_eos()

    def greedy(prompt: list[int], n: int) -> list[int]:
        out: list[int] = []
        for t in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, reset=True):
            out.append(int(t))
            if t == eos or len(out) >= n:
                break
        return out

    logits, gens = [], []
    for p in progress_bar(ids, desc="verify: llama.cpp", unit="prompt", enabled=progress):
        llm.reset()
        llm.eval(p)
        logits.append(torch.from_numpy(np.array(llm.scores[:len(p)], dtype=np.float32)))  # [T, V]
        gens.append(greedy(p, max_new))
    run = {"logits": logits, "generations": gens}
    if examples:
        spans = [_span(ex) for ex in examples]
        bar = progress_bar(spans, desc="verify: llama.cpp exact match", unit="example", enabled=progress)
        run["exact_match"] = sum(greedy(p, len(a)) == a for p, a in bar) / len(spans)
    run["tokenize"] = lambda text: llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
    return run


def _llama_cpp_check(path: Path, tok, prompts, ids, ref, base, examples, max_new, progress: bool = False) -> dict:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (pip install 'qlora-kit[gguf]')"}
    prompt_ids = [i[0].tolist() for i in ids]
    need = max(len(i) for i in prompt_ids + [ex.input_ids for ex in examples or []]) + max_new + 8
    run = _llama_cpp_run(path, prompt_ids, max_new, examples, 256 * -(-need // 256), progress)  # n_ctx: 256s
    result = compare_runs(ref, run)
    result["tokenizer_ids_identical"] = sum(run["tokenize"](p) == tok(p).input_ids for p in prompts) / len(prompts)
    if base is not None:
        result["logit_effect_retained"] = effect_retained(base, ref, run)
    if "exact_match" in run:
        result["exact_match"] = run["exact_match"]
    return result


def verify_gguf(path: Path, src, tok, info, quant: str, prompts: list[str] | None = None, eval_file=None,
                eval_limit: int | None = None, strict: bool = True, progress: bool = True,
                max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """Compare the GGUF at ``path`` with the reference model; return the report's verification part.

    With ``strict``, raises VerificationError when logits are NaN/inf, or when an f32/f16/bf16/q8_0 file of a
    dequantized merge (or of a merged folder) differs by more than its ``TOLERANCES`` entry.
    """
    prompts = prompts or DEFAULT_PROMPTS
    ids = [tok(p, return_tensors="pt").input_ids for p in prompts]  # each [1, T]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    examples = read_eval_examples(eval_file, tok)[:eval_limit] if eval_file is not None else None
    model = reference_model(src.plan) if src.plan is not None else plain_model(src.inputs[0])
    ref = run_prompts(model, ids, pad, max_new_tokens, "reference", progress)
    base = None
    if src.plan is not None:
        from qlora_kit.model.lora import adapters_disabled

        with adapters_disabled(model):
            base = run_prompts(model, ids, pad, 1, "4-bit base", progress)  # only its logits are used
    reference = {"model": "4-bit base + adapter" if src.plan is not None else "merged folder (fp32)",
                 **_evaluate(model, examples, progress)}
    free_model(model)

    model, overlaid = _transformers_gguf(path, src.config)
    loaded = run_prompts(model, ids, pad, max_new_tokens, "gguf", progress)
    hf = {**compare_runs(ref, loaded), **_evaluate(model, examples, progress), "config_from_source": overlaid}
    free_model(model)
    if base is not None:
        hf["logit_effect_retained"] = effect_retained(base, ref, loaded)
    hf["tokenizer_ids_identical"] = _tokenizer_agreement(path, tok, prompts)
    hf["generations"] = {"reference": [tok.decode(g) for g in ref["generations"]],
                         "gguf": [tok.decode(g) for g in loaded["generations"]]}
    result = {"prompts": prompts, "max_new_tokens": max_new_tokens, "reference": reference, "transformers": hf,
              "llama_cpp": _llama_cpp_check(path, tok, prompts, ids, ref, base, examples, max_new_tokens, progress)}
    if examples:
        result["eval_records"] = len(examples)
    _judge(result, src, quant, strict)
    return result


def _adapter_lost(result: dict) -> tuple[bool, str]:
    """(lost, by what): with ``--eval-file``, a runtime whose held-out exact match is under ``LOST_BELOW`` of the
    reference's has lost the adapter (the task decides: a lossy type may keep the answers while the logits move);
    without one, a runtime that keeps under ``LOST_BELOW`` of the adapter's logit effect on the prompts."""
    runs = (result["transformers"], result["llama_cpp"])
    ref_em = result["reference"].get("exact_match")
    if ref_em:
        kept = [r["exact_match"] / ref_em for r in runs if r.get("exact_match") is not None]
        return bool(kept) and min(kept) < LOST_BELOW, "held-out exact match"
    kept = [r["logit_effect_retained"] for r in runs if r.get("logit_effect_retained") is not None]
    return bool(kept) and min(kept) < LOST_BELOW, "logit effect on the prompts"


def _judge(result: dict, src, quant: str, strict: bool) -> None:
    """Tolerance, pass/fail and the plain 'adapter lost' verdict; raise in strict mode on a mismatch."""
    hf = result["transformers"]
    exact = src.plan is None or src.plan.merge_base == "dequantized"
    tol = TOLERANCES.get(quant) if exact else None
    result["tolerance"] = tol
    result["check"] = ("max |Δlogit| of the file (read by transformers) <= tolerance x max |logit| of the reference"
                       if tol is not None else "reported only (lossy llama.cpp type or original-weight merge)")
    result["passed"] = bool(hf["finite"] and (tol is None or hf["max_rel_logit_diff"] <= tol))
    result["adapter_lost"], result["adapter_lost_by"] = _adapter_lost(result)
    if strict and not result["passed"]:
        raise VerificationError(
            f"the GGUF does not reproduce the model: max |Δlogit| = {hf['max_abs_logit_diff']:.3g} "
            f"({hf['max_rel_logit_diff']:.3g} of the logit scale; tolerance {tol} for {quant}), finite={hf['finite']}. "
            "Nothing was written. Check that --base is the checkpoint the adapter was trained on, or rerun with "
            "--no-verify to inspect.")
