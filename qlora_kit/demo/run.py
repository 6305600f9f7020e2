"""The README's main job: fine-tune SmolLM2-135M-Instruct in 4-bit on the demo task, and show the gain."""
from __future__ import annotations

import argparse
import shlex
import textwrap
import time
from pathlib import Path

from qlora_kit.atomic import atomic_write_json
from qlora_kit.config import DataConfig, LoraConfig, ModelConfig, TrainConfig, TrainingConfig
from qlora_kit.data.prepare import prepare_data
from qlora_kit.data.sources import load_records
from qlora_kit.demo.estimate import Estimate, estimate_demo, minutes
from qlora_kit.demo.model import demo_model_path
from qlora_kit.demo.task import user_content, write_demo_dataset
from qlora_kit.inference.evaluate import evaluate
from qlora_kit.inference.prompts import record_prompt
from qlora_kit.model.load import footprint, load_model
from qlora_kit.model.lora import parameter_report
from qlora_kit.training.recipe import train

MAX_NEW_TOKENS = 32  # the held-out answers are about 15 tokens


def demo_config(model_path: Path, train_file: Path, eval_file: Path, out: Path, epochs: float = 1.0) -> TrainConfig:
    """The demo's settings: QLoRA r=16, alpha=32 on all linear layers, one epoch, batch 8, lr 2e-4 cosine."""
    return TrainConfig(
        model=ModelConfig(path=str(model_path)),
        lora=LoraConfig(r=16, alpha=32.0),
        data=DataConfig(train_file=str(train_file), eval_file=str(eval_file), max_seq_len=256),
        training=TrainingConfig(output_dir=str(out), epochs=epochs, batch_size=8, lr=2e-4, scheduler="cosine",
                                warmup_steps=5, eval_every=25, save_every=25),
    )


def _print_footprint(model) -> dict:
    """The 4-bit footprint (load_model already logged the load line and its time)."""
    fp = footprint(model)
    print(f"\n4-bit NF4 + double quant: {fp['bytes'] / 2**20:.1f} MiB in memory vs {fp['bf16_bytes'] / 2**20:.1f} MiB "
          f"in bf16 ({fp['bytes'] / fp['bf16_bytes']:.2f}x); 4-bit layers at "
          f"{8 * fp['bytes_per_quantized_param']:.3f} bits per parameter")
    return fp


def _side_by_side(records: list[dict], before: list[str], after: list[str], n: int = 4) -> None:
    for rec, b, a in list(zip(records, before, after))[:n]:
        print("\n  input:    " + textwrap.shorten(user_content(rec).split("\n\n")[-1], 100))
        print(f"  expected: {rec['output']}")
        print(f"  before:   {textwrap.shorten(b, 100) or '(empty)'}")
        print(f"  after:    {a}")


def try_it_command(adapter_dir: str | Path, prompt: str) -> str:
    """``qlora-kit generate --adapter DIR PROMPT`` with every argument shell-quoted: pastes as is into a shell."""
    return shlex.join(["qlora-kit", "generate", "--adapter", str(adapter_dir), prompt])


def _try_it(records: list[dict], tuned, adapter_dir: Path, base: Path, out: Path) -> None:
    """The next commands: generate on a held-out prompt the tuned model answers right (with its answer), merge."""
    hit = next((i for i, ex in enumerate(tuned.examples) if ex.correct), 0)
    print(f"\ntry it (expected answer: {records[hit]['output']}):\n  {try_it_command(adapter_dir, user_content(records[hit]))}")
    print(f"merge it:\n  {shlex.join(['qlora-kit', 'merge', '--base', str(base), '--adapter', str(adapter_dir), '--out', str(out / 'merged')])}")


def _expect(model, tokenizer, config: TrainConfig, eval_records: list[dict]) -> Estimate:
    """Print how long the demo should take here, from a timed training step and a timed generation batch."""
    train_set, eval_set, _ = prepare_data(config.data, tokenizer)
    prompts = [record_prompt(tokenizer, r, where=f"eval record {i}")[0] for i, r in enumerate(eval_records, 1)]
    est = estimate_demo(model, tokenizer, train_set, eval_set, prompts, config, MAX_NEW_TOKENS)
    print(f"\nexpected duration on this machine from here: about {minutes(est.total)} (2 evaluations of "
          f"{minutes(est.evaluation)}, training {minutes(est.training)} at {est.step:.1f} s per step; from a timed "
          "training step and a timed generation batch)")
    return est


def run_demo(args: argparse.Namespace) -> int:
    """Prepare the demo model and data, measure held-out exact match, fine-tune, measure again."""
    began = time.perf_counter()
    path = demo_model_path()
    print(f"demo model: {path}")
    if args.prepare:
        return 0
    out = Path(args.output or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    train_file, eval_file = write_demo_dataset(out / "data")
    eval_records = load_records(eval_file)
    model, tokenizer = load_model(path)
    fp = _print_footprint(model)
    config = demo_config(path, train_file, eval_file, out / "run", args.epochs)
    est = _expect(model, tokenizer, config, eval_records)
    estimated_at = time.perf_counter()

    print(f"\nheld-out exact match of the base model on {len(eval_records)} examples...")
    base = evaluate(model, tokenizer, eval_records, max_new_tokens=MAX_NEW_TOKENS, loss=False, progress=True)
    before, before_preds = base.score, [ex.prediction for ex in base.examples]
    print(f"base model: {before:.0%} exact match ({base.generate_seconds:.0f} s, {base.tokens_per_s:.0f} tokens/s)")

    print(f"\nfine-tuning: LoRA r={config.lora.r} alpha={config.lora.alpha:g} on all linear layers, "
          f"{config.training.epochs:g} epoch, batch {config.training.batch_size}, lr {config.training.lr:g}")
    result = train(config, model=model, tokenizer=tokenizer)
    print("\n" + str(parameter_report(model)))
    print(f"\nheld-out exact match of the fine-tuned model on {len(eval_records)} examples...")
    tuned = evaluate(model, tokenizer, eval_records, max_new_tokens=MAX_NEW_TOKENS, loss=False, progress=True)
    after, after_preds = tuned.score, [ex.prediction for ex in tuned.examples]
    print(f"\nheld-out exact match: {before:.0%} before -> {after:.0%} after fine-tuning")
    _side_by_side(eval_records, before_preds, after_preds)
    total = time.perf_counter() - began
    report = {"exact_match_before": before, "exact_match_after": after, "train_seconds": round(result.seconds, 1),
              "train_tokens_per_s": round(result.tokens_per_s, 1), "steps": result.steps,
              "peak_memory_mb": round(result.peak_memory_mb), "eval_loss": result.eval_loss,
              "model_bytes": fp["bytes"], "compute_dtype": str(model.qlora_compute_dtype).removeprefix("torch."),
              "adapter": str(result.adapter_dir), "expected_seconds": round(est.total, 1),
              "seconds_after_estimate": round(time.perf_counter() - estimated_at, 1), "total_seconds": round(total, 1)}
    atomic_write_json(out / "demo_report.json", report)
    print(f"\ntrained {result.steps} steps in {result.seconds:.0f} s ({result.tokens_per_s:.0f} tokens/s), "
          f"peak memory {result.peak_memory_mb:.0f} MB (RSS)")
    print(f"adapter: {result.adapter_dir}\nloss plot: {out / 'run' / 'loss.png'}\nreport: {out / 'demo_report.json'}")
    print(f"demo took {minutes(total)}: {minutes(time.perf_counter() - estimated_at)} after the estimate, which "
          f"expected about {minutes(est.total)}")
    _try_it(eval_records, tuned, result.adapter_dir, path, out)
    return 0 if after > before else 1
