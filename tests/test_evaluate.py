"""Generation and evaluation (inference/): prompts as trained, batched generation equal to plain transformers
greedy generation, the LM head on contiguous input, memory-sized batches, evaluate(), `qlora-kit eval`."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import load_tiny

from qlora_kit.config import DataConfig
from qlora_kit.data import IGNORE_INDEX
from qlora_kit.data.formats import detect_format
from qlora_kit.data.tokenize import tokenize_example
from qlora_kit.inference.evaluate import METRICS, evaluate, write_predictions
from qlora_kit.inference.generate import generate, generate_tokens
from qlora_kit.inference.prompts import record_prompt, render_prompt
from qlora_kit.testing.tiny import build_tokenizer

RECORDS = [
    {"instruction": "Convert the date to words.", "input": "2024-03-05", "output": "March fifth, 2024"},
    {"instruction": "What is the capital of France?", "output": "Paris."},
    {"prompt": "The quick brown fox", "completion": " jumps over the lazy dog."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris"}]},
]

ALPACA = RECORDS[:2] + [{"instruction": "Spell the word fox.", "output": "f o x"}]  # one format per file, as in training


def _templateless():
    tok = build_tokenizer()
    tok.chat_template = None
    return tok


@pytest.mark.parametrize("templated", [True, False])
@pytest.mark.parametrize("system", ["", "You are terse."])
def test_record_prompt_is_training_text_before_the_reply_token_for_token(templated, system):
    tok = build_tokenizer() if templated else _templateless()
    cfg = DataConfig(system_prompt=system)
    for i, record in enumerate(RECORDS if templated else RECORDS[:3]):  # chat records need a template
        prompt, reference = record_prompt(tok, record, system=system)
        ex = tokenize_example(record, detect_format(record, "r"), tok, cfg, f"r{i}")
        ids = tok(prompt.text, add_special_tokens=prompt.special_tokens)["input_ids"]
        assert ex.input_ids[: len(ids)] == ids  # the served prompt is the trained prefix
        assert ex.labels[len(ids)] != IGNORE_INDEX  # and the reply is trained from the next token on
        assert reference == (record.get("output") or record.get("completion") or record["messages"][-1]["content"])
        assert prompt.special_tokens is False  # the prompt contract gives every tokenizer a template


def test_render_prompt_uses_the_template_and_system_prompt():
    tok = build_tokenizer()
    assert render_prompt(tok, "Hi").text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    sys_text = render_prompt(tok, "Hi", system="S").text
    assert sys_text.startswith("<|im_start|>system\nS<|im_end|>\n") and not render_prompt(tok, "Hi").special_tokens
    plain = render_prompt(_templateless(), "Hi", system="S")
    assert (plain.text, plain.special_tokens) == ("S\n\nHi", True)
    assert render_prompt(tok, "Hi", chat=False).text == "Hi"


def test_metrics():
    em, js, has = METRICS["exact_match"], METRICS["json_match"], METRICS["contains"]
    assert em(" Paris.\n", "Paris") and not em("paris", "Paris")
    assert js('```json\n{"b": [1, 2], "a": 1}\n```', '{"a": 1, "b": [1, 2]}') and not js("{", '{"a": 1}')
    assert not js('{"a": 2}', '{"a": 1}') and js("Paris.", "Paris")  # a non-JSON reference: exact match
    assert has("The answer is Paris, of course", "Paris.") and not has("London", "Paris")


def _plain_greedy(model, tok, prompt, n):
    """transformers' own generate on one prompt: no batching, no padding, no dequantize-once, no head hook."""
    enc = tok(prompt.text, return_tensors="pt", add_special_tokens=prompt.special_tokens)
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, enc["input_ids"].shape[1]:].tolist()


@torch.no_grad()
def test_batched_generation_equals_plain_greedy_with_adapter(tiny_model_dir, tiny_adapter_dir):
    from qlora_kit.model.adapters import load_adapter

    model, tok = load_tiny(tiny_model_dir)
    load_adapter(model, tiny_adapter_dir)
    prompts = [render_prompt(tok, "What is the capital of France? " + "x " * i) for i in range(5)]
    gen = generate_tokens(model, tok, prompts, max_new_tokens=8, batch_size=3)
    model.eval()
    for prompt, got in zip(prompts, gen.tokens):
        want = _plain_greedy(model, tok, prompt, 8)
        assert got == want[: len(got)] and (len(got) == len(want) or got[-1] == tok.eos_token_id)
    assert gen.n_tokens == sum(map(len, gen.tokens)) and gen.batch_size == 3


@pytest.fixture(scope="module")
def gemma_262k(tmp_path_factory):
    from qlora_kit.testing.tiny import make_tiny_gemma3

    return make_tiny_gemma3(tmp_path_factory.mktemp("gemma3-262k"))


@torch.no_grad()
def test_large_vocab_head_gets_contiguous_last_position_and_tokens_match(gemma_262k):
    """Prefill computes logits for the last position only, and the head sees a contiguous [b, 1, h]."""
    from qlora_kit.model.lora import LoraConfig, add_lora

    model, tok = load_tiny(gemma_262k)
    add_lora(model, LoraConfig(r=4, alpha=8))
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: seen.append((tuple(args[0].shape), args[0].is_contiguous())))
    prompts = [render_prompt(tok, "Hello there " * (1 + i)) for i in range(4)]
    gen = generate_tokens(model, tok, prompts, max_new_tokens=6)
    hook.remove()
    assert gen.batch_size == 4  # all four fit the memory budget at once
    assert seen and all(shape[1] == 1 and contiguous for shape, contiguous in seen)
    assert seen[0][0] == (4, 1, 64)
    model.eval()
    for prompt, got in zip(prompts, gen.tokens):
        want = _plain_greedy(model, tok, prompt, 6)
        assert got == want[: len(got)]


@torch.no_grad()
def test_large_vocab_generation_peak_memory_stays_within_the_plan(gemma_262k):
    """bf16, batch 8, 262k vocabulary: the head on the strided [8, 1, h] slice took +263 MB here; contiguous it
    stays within the plan (KV cache + logits rows + the dequantized weights)."""
    from qlora_kit.inference.budget import sequence_bytes
    from qlora_kit.model.fused import dense_cache_bytes
    from qlora_kit.planning.models import architecture
    from qlora_kit.testing.measure import PeakSampler, read_status

    model, tok = load_tiny(gemma_262k, compute_dtype="bf16")
    prompts = [render_prompt(tok, "Hello there " * (3 + 2 * i)) for i in range(8)]
    generate_tokens(model, tok, prompts[:1], max_new_tokens=2, batch_size=1)  # warm up kernels and caches
    longest = max(len(tok(p.text)["input_ids"]) for p in prompts)
    plan = 8 * sequence_bytes(architecture(gemma_262k), longest, 8, 2) + dense_cache_bytes(model)
    sampler = PeakSampler()
    sampler.reset()
    start = read_status()[0]
    generate_tokens(model, tok, prompts, max_new_tokens=8, batch_size=8)
    sampler.sample()
    sampler.stop()
    assert sampler.peak_anon - start < 1.5 * plan + 16 * 2**20, (sampler.peak_anon - start, plan)


def test_batch_size_comes_from_memory_and_is_balanced(gemma_262k, monkeypatch):
    import qlora_kit.inference.budget as budget
    from qlora_kit.planning.models import architecture

    model, _ = load_tiny(gemma_262k)
    per_seq = budget.sequence_bytes(architecture(gemma_262k), 100, 50, 4)
    assert per_seq > 262_144 * 12  # at least one row of logits in fp32 plus its copies
    monkeypatch.setattr(budget, "available_memory", lambda device: int(2 * 10.5 * per_seq))
    assert budget.choose_batch_size(model, 100, 50, 100) == 10  # 10 fit; 100 prompts in batches of 10
    monkeypatch.setattr(budget, "available_memory", lambda device: 2**40)
    assert budget.choose_batch_size(model, 100, 50, 100) == 50  # capped at 64, evened out: 2 x 50
    assert budget.choose_batch_size(model, 100, 50, 3) == 3
    monkeypatch.setattr(budget, "available_memory", lambda device: 1)
    assert budget.choose_batch_size(model, 100, 50, 100) == 1


def test_evaluate_scores_loss_baseline_and_writes_predictions(tiny_model_dir, tiny_adapter_dir, tmp_path):
    from qlora_kit.data.prepare import prepare_data
    from qlora_kit.model.adapters import load_adapter
    from qlora_kit.model.lora import adapters_disabled
    from qlora_kit.training.recipe import evaluate_loss

    model, tok = load_tiny(tiny_model_dir)
    load_adapter(model, tiny_adapter_dir)
    records = [dict(r) for r in ALPACA]
    tuned = generate(model, tok, [record_prompt(tok, r)[0] for r in records], max_new_tokens=6)
    records[0]["output"] = tuned[0]  # the adapter's own answer: correct for it, (likely) not for the base
    result = evaluate(model, tok, records, max_new_tokens=6, baseline=True, batch_size=2)
    assert [e.prediction for e in result.examples] == tuned
    assert result.examples[0].correct and result.score == pytest.approx(
        sum(e.correct for e in result.examples) / 3)
    examples, _, _ = prepare_data(DataConfig(max_seq_len=2048), tok, records=records)
    assert result.loss == pytest.approx(evaluate_loss(model, examples, 2, tok.pad_token_id, 2048))
    with adapters_disabled(model):
        base = generate(model, tok, [record_prompt(tok, r)[0] for r in records], max_new_tokens=6)
    assert [e.prediction for e in result.baseline.examples] == base
    assert result.generated_tokens > 0 and result.tokens_per_s > 0
    rows = [json.loads(line) for line in write_predictions(result, tmp_path / "p.jsonl").read_text().splitlines()]
    assert rows[0]["prediction"] == tuned[0] and rows[0]["correct"] is True
    assert set(rows[0]) == {"prompt", "reference", "prediction", "correct", "base_prediction", "base_correct"}


def test_eval_cli_checks_adapter_before_loading(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import qlora_kit.model.load as load
    from qlora_kit.cli import main

    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:2]))
    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for cmd in (["eval", "--data", str(data)], ["generate", "hi"]):
        assert main([*cmd, "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "missing")]) == 2
        assert "missing" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "none.jsonl")]) == 2


def test_eval_and_generate_file_cli_end_to_end(tiny_model_dir, tiny_adapter_dir, tmp_path, capsys):
    from qlora_kit.cli import main

    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ALPACA))
    out = tmp_path / "preds.jsonl"
    args = ["--model", str(tiny_model_dir), "--adapter", str(tiny_adapter_dir), "--max-new-tokens", "4",
            "--compute-dtype", "fp32"]
    assert main(["eval", *args, "--data", str(data), "--out", str(out), "--baseline"]) == 0
    report = capsys.readouterr().out
    assert "exact_match" in report and "adapter" in report and "base" in report and "tokens/s" in report
    assert len(out.read_text().splitlines()) == len(ALPACA)
    gen_out = tmp_path / "gen.jsonl"
    assert main(["generate", *args, "--file", str(data), "--out", str(gen_out)]) == 0
    rows = [json.loads(line) for line in gen_out.read_text().splitlines()]
    assert [r["prediction"] for r in rows] == [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
