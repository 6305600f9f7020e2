"""The README's main job: the demo on the real SmolLM2-135M-Instruct model."""
from __future__ import annotations

import argparse
import time

from .config import LoraConfig
from .demo import demo_model_path
from .generate import generate
from .lora import add_lora, parameter_report
from .model import footprint, load_model

PROMPTS = ["What is the capital of France?", "Name three primary colors."]


def run_demo(args: argparse.Namespace) -> int:
    """Load the demo model in 4-bit, report its footprint and adapter parameters, and generate."""
    path = demo_model_path()
    print(f"demo model: {path}")
    if args.prepare:
        return 0
    start = time.perf_counter()
    model, tokenizer = load_model(path)
    load_s = time.perf_counter() - start
    fp = footprint(model)
    print(f"\nloaded in 4-bit NF4 + double quant in {load_s:.1f} s")
    print(f"  model in memory: {fp['bytes'] / 2**20:.1f} MiB vs {fp['bf16_bytes'] / 2**20:.1f} MiB in bf16 "
          f"({fp['bytes'] / fp['bf16_bytes']:.2f}x)")
    print(f"  4-bit layers: {fp['quantized_params']:,} params at {fp['bytes_per_quantized_param']:.4f} bytes each "
          f"({8 * fp['bytes_per_quantized_param']:.3f} bits)")
    add_lora(model, LoraConfig(r=16, alpha=32))
    print("\nLoRA r=16 alpha=32 on all linear layers:\n" + str(parameter_report(model)))
    print("\ngreedy generation (adapter initialised with B=0, so this is the base model):")
    for prompt, answer in zip(PROMPTS, generate(model, tokenizer, PROMPTS, max_new_tokens=24)):
        print(f"  Q: {prompt}\n  A: {answer}")
    return 0
