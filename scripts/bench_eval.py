"""Benchmark: `qlora-kit eval` generation against transformers + PEFT `generate` on the same 4-bit model.

Each side runs in its own process (peak RSS is the child's ru_maxrss): it loads the model in 4-bit NF4 +
double quant (bf16 compute), applies the same LoRA adapter (r=16 on all linear layers, random B, saved by
qlora-kit in PEFT format), and greedy-generates for the same prompts at the same batch size.

    python scripts/bench_eval.py --model demo --prompts 40 --new 32
    python scripts/bench_eval.py --model tiny-gemma3-262k --prompts 32 --new 32
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _prepare(model: str, work: Path) -> tuple[Path, Path, Path]:
    """The model folder (tiny Gemma 3: 262k vocabulary, hidden 640 as Gemma 3 270M), an adapter, the records."""
    import torch

    from qlora_kit import LoraConfig, add_lora, load_model, save_adapter
    from qlora_kit.demo.model import demo_model_path
    from qlora_kit.demo.task import write_demo_dataset
    from qlora_kit.model.lora import lora_layers
    from qlora_kit.testing.tiny import make_tiny_gemma3

    path = demo_model_path() if model == "demo" else make_tiny_gemma3(work / "gemma", hidden_size=640, dtype=torch.bfloat16)
    m, _ = load_model(path, compute_dtype="bf16")
    add_lora(m, LoraConfig(r=16, alpha=32))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(m):
            b = layer.adapters["default"].lora_B
            b.copy_(0.01 * torch.randn(b.shape, generator=g))
    adapter = save_adapter(m, work / "adapter")
    _, eval_file = write_demo_dataset(work / "data")
    return Path(path), Path(adapter), eval_file


def _ours(args) -> dict:
    from qlora_kit.inference.evaluate import evaluate
    from qlora_kit.model.adapters import load_adapter
    from qlora_kit.model.load import load_model

    model, tok = load_model(args.path, compute_dtype="bf16")
    load_adapter(model, args.adapter)
    r = evaluate(model, tok, args.data, max_new_tokens=args.new, batch_size=args.batch, loss=False, limit=args.prompts)
    return {"tokens": r.generated_tokens, "seconds": r.generate_seconds, "batch": r.batch_size,
            "predictions": [e.prediction for e in r.examples]}


def _peer(args) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qlora_kit.data.sources import load_records
    from qlora_kit.demo.task import user_content

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(args.path, quantization_config=q, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    tok = AutoTokenizer.from_pretrained(args.path, padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    texts = [tok.apply_chat_template([{"role": "user", "content": user_content(r)}], tokenize=False,
                                     add_generation_prompt=True) for r in load_records(args.data)[: args.prompts]]
    tokens, preds, start = 0, [], time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(texts), args.batch):
            enc = tok(texts[i:i + args.batch], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=args.new, do_sample=False, pad_token_id=tok.pad_token_id)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                cut = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
                tokens += cut
                preds.append(tok.decode(row[:cut], skip_special_tokens=True).strip())
    return {"tokens": tokens, "seconds": time.perf_counter() - start, "batch": args.batch, "predictions": preds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", choices=["demo", "tiny-gemma3-262k"])
    p.add_argument("--prompts", type=int, default=40)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        import torch

        torch.set_num_threads(2)
        out = (_ours if args.side == "ours" else _peer)(args)
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        path, adapter, data = _prepare(args.model, Path(tmp))
        rows = {}
        for side in ("ours", "peer"):
            cmd = [sys.executable, __file__, "--side", side, "--path", str(path), "--adapter", str(adapter),
                   "--data", str(data), "--prompts", str(args.prompts), "--new", str(args.new),
                   "--batch", str(args.batch)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    same = sum(a == b for a, b in zip(rows["ours"]["predictions"], rows["peer"]["predictions"]))
    for side, r in rows.items():
        print(f"{side:>5}: {r['tokens']} tokens in {r['seconds']:.1f} s = {r['tokens'] / r['seconds']:.1f} tokens/s, "
              f"batch {r['batch']}, peak RSS {r['peak_rss_mb']:.0f} MB")
    print(f"identical predictions: {same}/{len(rows['ours']['predictions'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
