"""``qlora-kit generate`` and ``qlora-kit eval``: check every input, load the model once, run, report."""

from __future__ import annotations

import argparse
import json
import textwrap

from qlora_kit.dtypes import NAMES, dtype_name
from qlora_kit.inference.evaluate import METRICS, EvalResult, evaluate, read_eval_records, write_predictions


def _check_inputs(args: argparse.Namespace) -> None:
    """Adapters and the output path are checked before any weight is loaded (ConfigError names the fix)."""
    from qlora_kit.model.adapter_check import check_adapter
    from qlora_kit.paths import check_output_path

    for adapter in args.adapter or []:
        check_adapter(adapter)
    if getattr(args, "out", None):
        inputs = {
            "--model": args.model,
            "--data": getattr(args, "data", None),
            "--file": getattr(args, "file", None),
        }
        check_output_path(args.out, inputs | {f"--adapter {a}": a for a in args.adapter or []})


def _load(args: argparse.Namespace):
    """The 4-bit model with ``--adapter`` folders stacked (the first is "default")."""
    from qlora_kit.data.contract import apply_contract
    from qlora_kit.model.adapters import load_adapter
    from qlora_kit.model.load import load_model

    model, tokenizer = load_model(args.model, compute_dtype=args.compute_dtype)  # "demo" was resolved by the CLI
    for i, adapter in enumerate(args.adapter or []):
        load_adapter(model, adapter, name=f"adapter{i}" if i else "default")
    if args.adapter:  # prompt as the (first) adapter was trained: its saved chat template and framing
        apply_contract(tokenizer, args.adapter[0])
    return model, tokenizer


def _generate_file(args: argparse.Namespace, model, tokenizer) -> int:
    from qlora_kit.atomic import atomic_write_bytes
    from qlora_kit.inference.generate import generate
    from qlora_kit.inference.prompts import record_prompt

    records = read_eval_records(args.file)
    cases = [record_prompt(tokenizer, r, where=f"{args.file} record {i}") for i, r in enumerate(records, 1)]
    answers = generate(
        model,
        tokenizer,
        [p for p, _ in cases],
        args.max_new_tokens,
        temperature=args.temperature,
        progress=True,
    )
    rows = [
        {"prompt": p.text, "prediction": a} | ({"reference": ref} if ref is not None else {})
        for (p, ref), a in zip(cases, answers)
    ]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if args.out:
        atomic_write_bytes(args.out, text.encode("utf-8"))
        print(f"wrote {len(rows)} predictions to {args.out}")
    else:
        print(text, end="")
    return 0


def _chat(args: argparse.Namespace, model, tokenizer) -> int:
    from transformers import TextStreamer

    from qlora_kit.inference.generate import generate

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    print("chat mode: type a prompt, an empty line or Ctrl-D quits")
    while True:
        try:
            prompt = input("> ").strip()
        except EOFError:
            return 0
        if not prompt:
            return 0
        generate(
            model, tokenizer, [prompt], args.max_new_tokens, temperature=args.temperature, streamer=streamer
        )


def run_generate(args: argparse.Namespace) -> int:
    """``qlora-kit generate``: prompts from the command line, a records file, or an interactive chat."""
    from qlora_kit.config import ConfigError
    from qlora_kit.inference.generate import generate

    if args.out and not args.file:
        raise ConfigError("--out writes the predictions of --file prompts.jsonl; give --file, or drop --out")
    if args.file:
        read_eval_records(args.file)  # a missing or malformed file fails before the model loads
    _check_inputs(args)
    model, tokenizer = _load(args)
    if args.file:
        return _generate_file(args, model, tokenizer)
    if args.prompt:
        for answer in generate(
            model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature
        ):
            print(answer)
        return 0
    return _chat(args, model, tokenizer)


def _cell(result: EvalResult, key: str) -> str:
    if key == "score":
        return "-" if result.score is None else f"{result.score:.1%}"
    if key == "loss":
        return "-" if result.loss is None else f"{result.loss:.4f}"
    return f"{result.tokens_per_s:.1f}" if result.generate_seconds else "-"


def format_report(result: EvalResult, differing: int = 3) -> str:
    """Metric, loss and speed (beside the base model's, when measured); a few examples where they differ."""
    cols = [("adapter" if result.baseline else "model", result)] + (
        [("base", result.baseline)] if result.baseline else []
    )
    lines = [f"{'':<24}" + "".join(f"{name:>12}" for name, _ in cols)]
    for key, label in (("score", result.metric), ("loss", "loss per response token"), ("speed", "tokens/s")):
        if key == "score" and result.score is None:
            continue
        lines.append(f"{label:<24}" + "".join(f"{_cell(r, key):>12}" for _, r in cols))
    lines.append(
        f"{len(result.examples) or '-'} examples, {result.generated_tokens} tokens generated in "
        f"{result.generate_seconds:.1f} s, batch {result.batch_size}"
    )
    if result.baseline:
        pairs = [
            (a, b) for a, b in zip(result.examples, result.baseline.examples) if a.prediction != b.prediction
        ]
        for a, b in pairs[:differing]:
            lines += [
                "",
                "  prompt:    " + textwrap.shorten(a.prompt, 100),
                f"  reference: {a.reference}",
                f"  adapter:   {textwrap.shorten(a.prediction or '', 100) or '(empty)'}",
                f"  base:      {textwrap.shorten(b.prediction or '', 100) or '(empty)'}",
            ]
    return "\n".join(lines)


def run_eval(args: argparse.Namespace) -> int:
    """``qlora-kit eval``: score the model (+ adapters) on records; print the report, write predictions."""
    records = read_eval_records(
        args.data, args.limit
    )  # a missing or malformed file fails before the model loads
    _check_inputs(args)
    model, tokenizer = _load(args)
    result = evaluate(
        model,
        tokenizer,
        records,
        args.metric,
        args.max_new_tokens,
        args.batch_size,
        args.format,
        args.system,
        max_seq_len=args.max_seq_len,
        baseline=args.baseline,
        progress=True,
    )
    print(format_report(result))
    if args.out and result.examples:
        print(f"predictions: {write_predictions(result, args.out)}")
    return 0


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="model folder, or 'demo' (default)")
    p.add_argument("--adapter", action="append", help="adapter folder (repeat to stack several)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--compute-dtype", type=compute_dtype_arg, default="auto", metavar="{auto," + ",".join(NAMES) + "}")



def compute_dtype_arg(text: str) -> str:
    """argparse type of --compute-dtype: "auto" or any spelling of a dtype, as its short name."""
    return text if text == "auto" else dtype_name(text)


def add_parsers(sub) -> None:
    """Register ``generate`` and ``eval`` on the CLI's subparsers."""
    gen = sub.add_parser("generate", help="generate with the 4-bit model and zero or more adapters")
    gen.add_argument("prompt", nargs="*", help="prompts; none (and no --file) starts an interactive chat")
    _model_arguments(gen)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--file", help="records to answer (JSONL/JSON/CSV/Parquet, any training format)")
    gen.add_argument(
        "--out", help="with --file: write prompt/prediction JSON lines here (default: print them)"
    )
    gen.set_defaults(func=run_generate)

    ev = sub.add_parser(
        "eval", help="score the model (+ adapters) on held-out records: metric, loss, tokens/s"
    )
    _model_arguments(ev)
    ev.add_argument("--data", required=True, help="records (JSONL/JSON/CSV/Parquet, any training format)")
    ev.add_argument("--metric", choices=list(METRICS), default="exact_match")
    ev.add_argument("--out", help="write prompt/reference/prediction/correct JSON lines here")
    ev.add_argument("--baseline", action="store_true", help="also score the base model (adapters disabled)")
    ev.add_argument("--batch-size", type=int, help="prompts per batch (default: chosen from memory)")
    ev.add_argument(
        "--format", default="auto", help="record format: auto, alpaca, chat, prompt_completion, text"
    )
    ev.add_argument("--system", help="the system prompt training used (data.system_prompt), if any")
    ev.add_argument("--max-seq-len", type=int, default=2048, help="tokens per example for the loss")
    ev.add_argument("--limit", type=int, help="only the first N records")
    ev.set_defaults(func=run_eval)
