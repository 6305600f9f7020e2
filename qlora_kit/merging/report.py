"""merge_report.json and the terminal summary: what was merged, how, and what the output dtype did to ΔW."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qlora_kit.dtypes import lookup
from qlora_kit.merging.plan import MergePlan
from qlora_kit.merging.weights import CAST_ERROR_LIMIT, weighted_mean

REQUANT_LOST_BELOW = 0.5  # a re-quantized export keeping less than this fraction of ΔW has lost the adapter


def build_report(plan: MergePlan, written: dict, out: Path, seconds: float) -> dict:
    """The merge part of merge_report.json from the plan and ``write.write_model``'s result (verification is
    added by the caller)."""
    layers = written["layers"]
    report = {
        "base": str(plan.base), "adapter": str(plan.adapter_dir), "out": str(out), "merge_base": plan.merge_base,
        "dtype": lookup(plan.out_dtype).long, "rank": plan.rank, "scale": plan.scale,
        "quant": dataclasses.asdict(plan.quant), "modules_merged": len(layers),
        "copies": sorted(it.key for it in plan.items if it.copy is not None),
        "shards": written["shards"], "bytes": written["bytes"], "merge_seconds": round(seconds, 2),
        "cast_error_rel_to_delta": weighted_mean(layers, "cast_error_rel_to_delta"),
        "dtype_auto": plan.dtype_auto, "notes": list(plan.notes), "layers": layers,
    }
    cast = report["cast_error_rel_to_delta"]
    if cast is not None and cast > CAST_ERROR_LIMIT:
        report["notes"].append(f"casting to {report['dtype']} changes the merged weights by {cast:.2f}x the adapter's "
                               "delta (the delta is small next to the weights); export with dtype fp32 to keep it")
    if plan.requantize is not None:
        retained = weighted_mean(layers, "requant_retained")
        report["requantized"] = {
            "quant_type": plan.requantize.quant_type, "weight_delta_retained": retained,
            "error_rel_to_delta": weighted_mean(layers, "requant_error_rel_to_delta"),
            "adapter_lost": retained is not None and retained < REQUANT_LOST_BELOW}
    return report


def _dtype_words(report: dict) -> str:
    """The output dtype, and why when ``--dtype auto`` did not keep the checkpoint's."""
    auto = report.get("dtype_auto")
    if not auto or auto["chosen"] == auto["checkpoint_dtype"]:
        return report["dtype"]
    return (f"{report['dtype']}, not the checkpoint's {auto['checkpoint_dtype']}: that would change the weights by "
            f"{auto['cast_error_rel_to_delta']:.2f}x the adapter's delta")


def format_summary(report: dict) -> str:
    """A few plain lines for the terminal: what was written, how it compares, and what was lost."""
    lines = [(f"merged {report['modules_merged']} modules ({report['merge_base']} base, rank {report['rank']}, "
              f"{_dtype_words(report)}) into {report['out']}: {report['shards']} shard(s), "
              f"{report['bytes'] / 2**20:.1f} MiB in {report['merge_seconds']:.1f} s")]
    lines += [f"note: {n}" for n in report["notes"]]
    rq = report.get("requantized")
    if rq:
        kept = rq["weight_delta_retained"]
        lines.append(f"re-quantized to {rq['quant_type']}: {100 * (kept or 0):.0f}% of the adapter's weight change "
                     f"survives (error {rq['error_rel_to_delta'] or 0:.2f}x the delta)")
        if rq["adapter_lost"]:
            lines.append("THE ADAPTER IS LOST: re-quantizing the merged weights rounds them back to the base model's "
                         "4-bit values. This export behaves like the base model. Export without --requantize "
                         "(bf16/fp32) to keep the fine-tune, or serve the 4-bit base with the adapter.")
    return "\n".join(lines + _verification_lines(report.get("verification") or {}))


def _verification_lines(v: dict) -> list[str]:
    lines = []
    if "max_abs_logit_diff" in v:
        tol = f" (tolerance {v['tolerance']:g} relative)" if v.get("tolerance") else ""
        lines.append(f"verification on {len(v['prompts'])} prompts vs 4-bit + adapter: max |Δlogit| "
                     f"{v['max_abs_logit_diff']:.3g} = {v['max_rel_logit_diff']:.2e} of the logit scale{tol}, "
                     f"mean {v['mean_abs_logit_diff']:.3g}; greedy generations identical "
                     f"{100 * v['generations_identical']:.0f}% ({100 * v['generation_token_agreement']:.0f}% of tokens)"
                     f" -> {'PASS' if v['passed'] else 'FAIL'}")
    if "logit_effect_retained" in v:
        lines.append(f"logit effect of the adapter retained by the export: {100 * v['logit_effect_retained']:.0f}%")
    for name, loss in (v.get("eval_loss") or {}).items():
        lines.append(f"eval loss {name}: {loss:.4f}")
    return lines
