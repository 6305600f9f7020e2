"""A model without a chat template, train -> `qlora-kit eval --adapter` -> `qlora-kit merge` -> plain transformers:
held-out exact match at every stage (issue 16's "Done when", on a real checkpoint).

    python scripts/template_less_roundtrip.py --model ~/.cache/qlora-kit/SmolLM2-135M-Instruct --work /tmp/roundtrip

1. copies --model to WORK/base without its chat template (tokenizer_config.json's ``chat_template`` and
   chat_template.jinja/.json), as base checkpoints come; 2. writes the demo task's data (``--train`` + 100
   held-out records); 3. ``qlora-kit train`` with the demo's settings plus the generation metric on the held-out
   records (``training.eval_generate_every``); 4. ``qlora-kit eval --adapter``; 5. ``qlora-kit merge`` (with
   ``--eval-file``); 6. plain transformers on the merged folder: ``apply_chat_template`` of the merged
   tokenizer, left-padded greedy ``generate``. Every stage's exact match goes to WORK/roundtrip.json. The
   commands run as subprocesses, exactly as printed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from qlora_kit.atomic import atomic_write_json
from qlora_kit.config import to_dict
from qlora_kit.data.sources import load_records
from qlora_kit.demo.run import demo_config
from qlora_kit.demo.task import user_content, write_demo_dataset
from qlora_kit.inference.evaluate import exact_match_one

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def strip_template(model: Path, out: Path) -> Path:
    """A copy of the checkpoint folder without any chat template."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(model, out, ignore=shutil.ignore_patterns(*TEMPLATE_FILES))
    config = out / "tokenizer_config.json"
    settings = json.loads(config.read_text())
    settings.pop("chat_template", None)
    config.write_text(json.dumps(settings, indent=2))
    return out


def run(cmd: list[str], log: Path) -> float:
    """Run a qlora-kit command, tee its output to ``log``; return its wall time. Raises on failure."""
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{cmd[3]} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start


@torch.no_grad()
def plain_transformers(merged: Path, records: list[dict], max_new_tokens: int, batch: int) -> dict:
    """Exact match of the merged folder with transformers alone: its tokenizer's chat template, greedy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(merged))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": user_content(r)}], tokenize=False,
                                     add_generation_prompt=True) for r in records]
    preds, start = [], time.perf_counter()
    for k in range(0, len(texts), batch):
        enc = tok(texts[k:k + batch], add_special_tokens=False, padding=True, return_tensors="pt")  # the template
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        preds += tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)  # [b, new]
    correct = [exact_match_one(p.strip(), r["output"]) for p, r in zip(preds, records)]
    return {"exact_match": sum(correct) / len(correct), "seconds": round(time.perf_counter() - start, 1),
            "dtype": str(model.dtype).removeprefix("torch."), "first_prompt": texts[0],
            "predictions": [p.strip() for p in preds]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a checkpoint folder (its chat template is dropped)")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder for everything this writes")
    ap.add_argument("--train", type=int, default=600, help="training records of the demo task (held-out: 100)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    work, py = args.work, [sys.executable, "-m", "qlora_kit"]
    work.mkdir(parents=True, exist_ok=True)
    base = strip_template(args.model.expanduser(), work / "base")
    train_file, eval_file = write_demo_dataset(work / "data", n_train=args.train)
    config = demo_config(base, train_file, eval_file, work / "run")
    config.training.eval_generate_every = config.training.eval_every  # the generation metric, every evaluation
    (work / "train.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    report: dict = {"model": str(args.model), "train_records": args.train, "eval_records": 100}
    if (work / "run").exists():
        shutil.rmtree(work / "run")
    report["train_seconds"] = run(py + ["train", str(work / "train.yaml")], work / "train.log")
    summary = json.loads((work / "run" / "summary.json").read_text())
    report["train"] = {k: summary[k] for k in ("eval_exact_match", "eval_loss", "steps", "tokens_per_s")}
    adapter = work / "run" / "adapter"
    report["contract"] = json.loads((adapter / "prompt_contract.json").read_text())

    preds = work / "eval-preds.jsonl"
    run(py + ["eval", "--model", str(base), "--adapter", str(adapter), "--data", str(eval_file), "--max-new-tokens",
              str(args.max_new_tokens), "--out", str(preds)], work / "eval.log")
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    report["eval_adapter"] = {"exact_match": sum(r["correct"] for r in rows) / len(rows)}

    merged = work / "merged"
    run(py + ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(merged), "--overwrite",
              "--eval-file", str(eval_file)], work / "merge.log")
    merge_report = json.loads((merged / "merge_report.json").read_text())
    report["merge"] = {k: merge_report.get(k) for k in ("dtype",)} | {
        k: merge_report["verification"].get(k) for k in ("passed", "max_rel_logit_diff", "generations_identical",
                                                        "eval_loss")}
    plain = plain_transformers(merged, load_records(eval_file), args.max_new_tokens, batch=20)
    agree = sum(p == r["prediction"] for p, r in zip(plain.pop("predictions"), rows))
    report["plain_transformers"] = plain | {"same_prediction_as_eval_adapter": agree}
    atomic_write_json(work / "roundtrip.json", report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
