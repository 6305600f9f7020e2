"""``qlora-kit export`` (and ``merge --gguf``): the GGUF export on the command line, with a plain summary."""
from __future__ import annotations

import argparse
import sys

from qlora_kit.merging.gguf_map import QUANT_TYPES


def format_export_summary(report: dict) -> str:
    """A few plain lines: what was written, how it compares with the model, and whether the adapter survived."""
    tok = report["tokenizer"]
    lines = [f"wrote {report['out']} ({report['architecture']}, {report['quant']}, {report['bytes'] / 2**20:.1f} MiB, "
             f"{report['tensors']} tensors) in {report['write_seconds']:.1f} s; tokenizer {tok['tokens']} tokens "
             f"(pre {tok['pre']}), chat template {'included' if tok['chat_template'] else 'absent'}"]
    lines += [f"note: {n}" for n in report["notes"]]
    w = report.get("weights")
    if w and w["weight_delta_retained"] is not None:
        lines.append(f"adapter weight change kept by the stored weights: {100 * w['weight_delta_retained']:.1f}% "
                     f"(error {w['error_rel_to_delta']:.3f}x the change)")
    v = report.get("verification")
    for name in ("transformers", "llama_cpp"):
        r = (v or {}).get(name)
        if not r:
            continue
        if "skipped" in r:
            lines.append(f"{name}: skipped ({r['skipped']})")
            continue
        kept = f", adapter logit effect kept {100 * r['logit_effect_retained']:.0f}%" if "logit_effect_retained" in r else ""
        em = f", exact match {100 * r['exact_match']:.0f}%" if "exact_match" in r else ""
        lines.append(f"{name}: max |Δlogit| {r['max_rel_logit_diff']:.2e} of the logit scale, greedy tokens agree "
                     f"{100 * r['generation_token_agreement']:.0f}%, tokenizer ids identical "
                     f"{100 * r['tokenizer_ids_identical']:.0f}%{kept}{em}")
    if v:
        ref_em = v["reference"].get("exact_match")
        if ref_em is not None:
            lines.append(f"reference ({v['reference']['model']}) exact match {100 * ref_em:.0f}%")
        tol = f" (tolerance {v['tolerance']:g})" if v["tolerance"] is not None else ""
        lines.append(f"verification: {'PASS' if v['passed'] else 'FAIL'}{tol}; {v['check']}")
        if v["adapter_lost"]:
            lines.append(f"THE ADAPTER IS LOST in {report['quant']} (by {v['adapter_lost_by']}): the quantized model "
                         "behaves like the base model. Export a finer type (q8_0, f16) to keep the fine-tune.")
    return "\n".join(lines)


def run_export(args: argparse.Namespace) -> int:
    """The ``export`` command (``merge --gguf`` calls it with ``quant`` set from ``--gguf``)."""
    from qlora_kit.merging.gguf_export import export_gguf
    from qlora_kit.merging.verify import VerificationError

    try:
        report = export_gguf(args.out, base=args.base, adapter=args.adapter, model=getattr(args, "model", None),
                             quant=args.quant, merge_base=args.merge_base, rank=args.rank, overwrite=args.overwrite,
                             verify=not args.no_verify, eval_file=args.eval_file,
                             eval_limit=getattr(args, "eval_limit", None))
    except VerificationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_export_summary(report))
    stem = str(args.out)[:-len(".gguf")]
    print(f"report: {stem}.export_report.json; Ollama: ollama create NAME -f {stem}.Modelfile")
    return 3 if (report.get("verification") or {}).get("adapter_lost") else 0


def add_parser(sub) -> None:
    """Register ``export`` on the CLI's subparsers."""
    ex = sub.add_parser("export", help="export to GGUF for llama.cpp / Ollama (merging an adapter on the way), verified")
    ex.add_argument("--base", help="the base checkpoint folder the adapter was trained on")
    ex.add_argument("--adapter", help="the adapter folder (PEFT format)")
    ex.add_argument("--model", help="an already merged folder (instead of --base and --adapter)")
    ex.add_argument("--out", required=True, help="the .gguf file (an Ollama .Modelfile and a report go beside it)")
    ex.add_argument("--format", choices=["gguf"], default="gguf", help="output format (gguf)")
    ex.add_argument("--quant", default="q8_0", type=str.lower, choices=QUANT_TYPES,
                    help="f32, f16, bf16, q8_0 (default), or a llama.cpp type such as q4_k_m (needs qlora-kit[gguf])")
    ex.add_argument("--merge-base", choices=["dequantized", "original"], default="dequantized",
                    help="add the adapter to dequant(quant(W)) as trained (default) or to the original W")
    ex.add_argument("--rank", type=int, help="merge only the first RANK components (dynamic-rank adapters)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    ex.add_argument("--no-verify", action="store_true", help="skip loading the file back and comparing it")
    ex.add_argument("--eval-file", help="JSONL records in the trained format: eval loss and exact match per runtime")
    ex.add_argument("--eval-limit", type=int, help="use only the first N records of --eval-file")
    ex.set_defaults(func=run_export)
