"""Merge and export: merged weights against a bitsandbytes reference, logits against the adapter model,
interop, errors that write nothing, a streaming memory bound measured in a subprocess, rank reduction
and re-quantization."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_tiny
from safetensors import safe_open
from safetensors.torch import save_file

from qlora_kit import LoraConfig, add_lora, load_adapter, merge_and_export, save_adapter
from qlora_kit.merging.plan import MergeError
from qlora_kit.model.adapters import read_adapter
from qlora_kit.model.lora import lora_layers
from qlora_kit.model.quant import dequantize_weight

PROMPTS = ["The capital of France is", "Q: What is 12 times 7?\nA:"]  # verification prompts (fewer = faster)
IDS = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))


def _random_adapter(base, out, scale=0.1, seed=0, compute_dtype="fp32", **lora):
    """A non-trivial adapter: LoRA with random B (and random lm_head/embedding copies if saved)."""
    model, tok = load_tiny(base, compute_dtype=compute_dtype)
    add_lora(model, LoraConfig(**{"r": 4, "alpha": 8, **lora}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for a in layer.adapters.values():
                a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * scale)
        for m in model.modules():
            if hasattr(m, "copies"):
                for c in m.copies.values():
                    c.weight.add_(torch.randn(c.weight.shape, generator=g) * 0.02)
    save_adapter(model, out)
    return model, tok


def _tensors(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter") / "ad"
    _random_adapter(tiny_model_dir, path)
    return path


def test_merged_weights_equal_bitsandbytes_reference(tiny_model_dir, adapter_dir, tmp_path):
    merge_and_export(tiny_model_dir, adapter_dir, tmp_path / "m", dtype="fp32", verify=False, progress=False, prompts=PROMPTS)
    merged, base = _tensors(tmp_path / "m"), _tensors(tiny_model_dir)
    ad = read_adapter(adapter_dir)
    model, _ = load_tiny(tiny_model_dir)  # the 4-bit layers training saw
    modules = dict(model.named_modules())
    for name, (a, b) in ad.lora.items():
        ref = dequantize_weight(modules[name]) + 2.0 * b @ a  # bnb dequantize + (alpha/r)·B·A, alpha/r = 8/4
        torch.testing.assert_close(merged[f"{name}.weight"], ref, atol=1e-6, rtol=0)
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(merged[key], base[key])  # not quantized by the loader: passed through
    assert set(merged) == set(base)
    # dynamic-rank merge: only the first k components, scaled alpha/k
    merge_and_export(tiny_model_dir, adapter_dir, tmp_path / "k2", dtype="fp32", verify=False, rank=2, progress=False, prompts=PROMPTS)
    name, (a, b) = next(iter(ad.lora.items()))
    ref = dequantize_weight(modules[name]) + (8 / 2) * b[:, :2] @ a[:2]
    torch.testing.assert_close(_tensors(tmp_path / "k2")[f"{name}.weight"], ref, atol=1e-6, rtol=0)


def test_merged_logits_match_adapter_model_and_load_with_transformers(tiny_model_dir, adapter_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = merge_and_export(tiny_model_dir, adapter_dir, tmp_path / "fp32", dtype="fp32", progress=False, prompts=PROMPTS)
    v = report["verification"]
    assert v["passed"] and v["max_rel_logit_diff"] <= 1e-4 and v["generations_identical"] == 1.0
    assert json.loads((tmp_path / "fp32" / "merge_report.json").read_text())["verification"]["passed"]
    cfg = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    assert (tmp_path / "fp32" / "generation_config.json").is_file() and (tmp_path / "fp32" / "chat_template.jinja").is_file()

    # independent check: plain transformers on the merged folder vs qlora-kit 4-bit + adapter
    ref_model, _ = load_tiny(tiny_model_dir)
    load_adapter(ref_model, adapter_dir)
    ref = _logits(ref_model)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp32"), dtype=torch.float32)
    got = _logits(merged)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "fp32"))
    out = merged.generate(**tok("Paris is", return_tensors="pt"), max_new_tokens=5, do_sample=False,
                          pad_token_id=tok.pad_token_id)
    assert out.shape[1] > 3

    report = merge_and_export(tiny_model_dir, adapter_dir, tmp_path / "bf16", dtype="bf16", progress=False, prompts=PROMPTS)
    v = report["verification"]
    assert v["passed"] and v["max_rel_logit_diff"] <= 5e-2 and report["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as h:
        assert h.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16


def test_adapter_from_another_base_is_refused_and_nothing_written(adapter_dir, tmp_path):
    from qlora_kit.testing.tiny import make_tiny_model

    other = make_tiny_model(tmp_path / "wide", hidden_size=96, intermediate_size=160)
    with pytest.raises(MergeError, match="does not fit this base model.*down_proj: adapter A"):
        merge_and_export(other, adapter_dir, tmp_path / "out", progress=False, prompts=PROMPTS)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_unless_overwrite(tiny_model_dir, adapter_dir, tmp_path):
    from qlora_kit.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", "--base", str(tiny_model_dir), "--adapter", str(adapter_dir), "--out", str(out),
                 "--no-verify"]) == 2
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match="is not a previous merge output"):  # not ours: kept even so
        merge_and_export(tiny_model_dir, adapter_dir, out, overwrite=True, verify=False, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    merge_and_export(tiny_model_dir, adapter_dir, out, overwrite=True, verify=False, progress=False, prompts=PROMPTS)
    assert (out / "model.safetensors").is_file()


def test_missing_shard_is_a_clear_error_and_nothing_written(tiny_model_dir, adapter_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).save_pretrained(sharded, max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / f).write_bytes((Path(tiny_model_dir) / f).read_bytes())
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(MergeError, match=shards[1].name):
        merge_and_export(sharded, adapter_dir, tmp_path / "out", progress=False, prompts=PROMPTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded"]  # no output, no temporary folder


def test_tied_embeddings_with_trained_head_are_untied(tmp_path):
    from qlora_kit.testing.tiny import make_tiny_model

    base = make_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    _random_adapter(base, tmp_path / "ad", target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    report = merge_and_export(base, tmp_path / "ad", tmp_path / "out", dtype="fp32", progress=False, prompts=PROMPTS)
    assert report["verification"]["passed"] and any("untied" in n for n in report["notes"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    merged = _tensors(tmp_path / "out")
    assert "lm_head.weight" in merged and not torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])


def test_added_tokens_resize_embeddings_and_copy_the_tokenizer(tiny_model_dir, tmp_path):
    model, tok = load_tiny(tiny_model_dir)
    tok.add_tokens(["<tool>", "</tool>"])
    model.resize_token_embeddings(len(tok))
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.adapters["default"].lora_B.normal_(0, 0.1)
    save_adapter(model, tmp_path / "ad")
    tok.save_pretrained(tmp_path / "ad")
    report = merge_and_export(tiny_model_dir, tmp_path / "ad", tmp_path / "out", dtype="fp32", progress=False, prompts=PROMPTS)
    assert report["verification"]["passed"]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["vocab_size"] == len(tok)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path / "out")).convert_tokens_to_ids("<tool>") == len(tok) - 2


SYNTHETIC = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=8,
                 num_key_value_heads=8)
CHILD = r"""
import json, sys
import bitsandbytes.functional, torch, transformers
from transformers import AutoModelForCausalLM, LlamaForCausalLM
from qlora_kit.config import QuantConfig
from qlora_kit.merging.pipeline import merge_and_export
from qlora_kit.model.quant import quantize_roundtrip
import qlora_kit.merging.write
quantize_roundtrip(torch.randn(64, 64), QuantConfig())  # load the kernels before the baseline

def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024

baseline = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
merge_and_export(sys.argv[1], sys.argv[2], sys.argv[3], verify=False, shard_size=sys.argv[4], progress=False)
print(json.dumps({"baseline": baseline, "peak": status("VmHWM")}))
"""


def _peft_style_adapter(base: Path, out: Path, r=8):
    """An adapter written directly (no 4-bit load of the big model): q/v/down_proj of every layer."""
    out.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors, h, i = {}, SYNTHETIC["hidden_size"], SYNTHETIC["intermediate_size"]
    for layer in range(SYNTHETIC["num_hidden_layers"]):
        for mod, (o, n) in {"self_attn.q_proj": (h, h), "self_attn.v_proj": (h, h), "mlp.down_proj": (h, i)}.items():
            key = f"base_model.model.model.layers.{layer}.{mod}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, n, generator=g) / n ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(o, r, generator=g) * 0.01
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]}))


def test_streaming_merge_peak_rss_stays_under_two_shards_plus_slack(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_kit.testing.tiny import build_tokenizer

    base, shard = tmp_path / "synthetic", 24 * 2**20
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=384, **SYNTHETIC)).save_pretrained(base, max_shard_size=shard)
    build_tokenizer().save_pretrained(base)
    _peft_style_adapter(base, tmp_path / "ad")
    total = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    bound = 2 * shard + 64 * 2**20  # one input shard + one output shard + a few fp32 tensors (11 MiB each)
    assert len(list(base.glob("*.safetensors"))) >= 8 and total > 2 * bound
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(base), str(tmp_path / "ad"), str(tmp_path / "out"),
                           str(shard)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = rss["peak"] - rss["baseline"]
    print(f"synthetic {total / 2**20:.0f} MiB in {len(list(base.glob('*.safetensors')))} shards: "
          f"peak RSS growth {growth / 2**20:.0f} MiB (bound {bound / 2**20:.0f} MiB)")
    assert growth < bound
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) >= 8
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


def test_adapter_resize_keeps_all_energy_at_full_rank_and_the_best_rank_k(adapter_dir, tmp_path):
    from qlora_kit.merging.resize import adapter_resize

    full = adapter_resize(adapter_dir, tmp_path / "r4", 4)
    assert min(full["layers"].values()) == pytest.approx(1.0, abs=1e-9)
    src, same = read_adapter(adapter_dir), read_adapter(tmp_path / "r4")
    for name, (a, b) in src.lora.items():
        a2, b2 = same.lora[name]
        torch.testing.assert_close(same.config.scaling * b2 @ a2, src.config.scaling * b @ a, atol=1e-5, rtol=1e-5)
    small = adapter_resize(adapter_dir, tmp_path / "r2", 2)
    two = read_adapter(tmp_path / "r2")
    assert two.config.r == 2 and two.config.scaling == pytest.approx(src.config.scaling)
    for name, (a, b) in src.lora.items():
        a2, b2 = two.lora[name]
        assert a2.shape == (2, a.shape[1]) and b2.shape == (b.shape[0], 2)
        s = torch.linalg.svdvals(src.config.scaling * b.double() @ a.double())
        assert small["layers"][name] == pytest.approx((s[:2].pow(2).sum() / s.pow(2).sum()).item(), rel=1e-6)
        err = torch.linalg.matrix_norm(two.config.scaling * b2.double() @ a2.double()
                                       - src.config.scaling * b.double() @ a.double())
        assert err.item() == pytest.approx(s[2:].pow(2).sum().sqrt().item(), rel=1e-4)  # Eckart–Young optimum


def test_requantize_reports_a_small_delta_as_lost(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    _random_adapter(tiny_model_dir, tmp_path / "ad", scale=2e-4)
    report = merge_and_export(tiny_model_dir, tmp_path / "ad", tmp_path / "q", requantize="nf4", progress=False, prompts=PROMPTS)
    rq = report["requantized"]
    assert rq["weight_delta_retained"] < 0.3 and rq["error_rel_to_delta"] > 0.7 and rq["adapter_lost"]
    assert report["verification"]["logit_effect_retained"] < 0.5
    from qlora_kit.merging.report import format_summary

    assert "THE ADAPTER IS LOST" in format_summary(report)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"))
    assert torch.isfinite(_logits(model)).all()


@pytest.mark.real_model
def test_demo_model_merge_generates_like_the_adapter_model(demo_model_dir, tmp_path):
    """SmolLM2-135M with a random-B adapter on q/v (the trained demo adapter when it exists)."""
    from qlora_kit.model.load import load_model

    model, tok = load_model(demo_model_dir, compute_dtype="fp32", device="cpu")
    add_lora(model, LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.adapters["default"].lora_B.normal_(0, 0.01)
    save_adapter(model, tmp_path / "ad")
    del model
    report = merge_and_export(demo_model_dir, tmp_path / "ad", tmp_path / "out", dtype="fp32", progress=False, prompts=PROMPTS)
    v = report["verification"]
    assert v["passed"] and v["generations_identical"] == 1.0, v


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory):
    from qlora_kit.testing.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("bf16") / "base", dtype=torch.bfloat16)


def test_dtype_auto_writes_fp32_when_bf16_would_erase_the_adapter(bf16_base, tmp_path):
    """A delta small next to bf16 rounding of the weights (scale 2e-4: cast error ~0.6x ||ΔW||) -> fp32."""
    from qlora_kit.merging.report import format_summary
    from qlora_kit.merging.weights import CAST_ERROR_LIMIT

    _random_adapter(bf16_base, tmp_path / "ad", scale=2e-4)
    report = merge_and_export(bf16_base, tmp_path / "ad", tmp_path / "m", progress=False, prompts=PROMPTS)
    auto = report["dtype_auto"]
    assert report["dtype"] == "float32" and auto["checkpoint_dtype"] == "bfloat16" and auto["chosen"] == "float32"
    assert auto["cast_error_rel_to_delta"] > CAST_ERROR_LIMIT and report["cast_error_rel_to_delta"] == 0.0
    assert any("dtype auto wrote float32" in n for n in report["notes"])
    assert "float32, not the checkpoint's bfloat16" in format_summary(report).splitlines()[0]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "float32"
    assert _tensors(tmp_path / "m")["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    v = report["verification"]  # fp32 + dequantized: held to the strict tolerance
    assert v["tolerance"] == 1e-4 and v["passed"]
    # the same adapter with an explicit bf16 is written in bf16 and the loss is noted
    lossy = merge_and_export(bf16_base, tmp_path / "ad", tmp_path / "b", dtype="bf16", verify=False, progress=False)
    assert lossy["dtype"] == "bfloat16" and lossy["dtype_auto"] is None
    assert lossy["cast_error_rel_to_delta"] == pytest.approx(auto["cast_error_rel_to_delta"], rel=1e-6)
    assert any("export with dtype fp32 to keep it" in n for n in lossy["notes"])


def test_dtype_auto_keeps_bf16_when_the_delta_survives_the_cast(bf16_base, tmp_path, capsys):
    """A delta large next to bf16 rounding (scale 0.1: cast error ~0.002x ||ΔW||) -> the checkpoint's bf16."""
    from qlora_kit.cli import main
    from qlora_kit.merging.weights import CAST_ERROR_LIMIT

    _random_adapter(bf16_base, tmp_path / "ad", scale=0.1)
    assert main(["merge", "--base", str(bf16_base), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "m"),
                 "--no-verify"]) == 0
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["dtype"] == "bfloat16" and report["dtype_auto"]["chosen"] == "bfloat16"
    assert report["dtype_auto"]["cast_error_rel_to_delta"] < CAST_ERROR_LIMIT and not report["notes"]
    assert report["cast_error_rel_to_delta"] == pytest.approx(report["dtype_auto"]["cast_error_rel_to_delta"], rel=1e-6)
    assert _tensors(tmp_path / "m")["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert "rank 4, bfloat16) into" in capsys.readouterr().out


def test_verification_and_eval_loss_show_progress_with_eta(tiny_model_dir, tiny_adapter_dir, tmp_path, capsys):
    """Every verification phase over the prompts (and the eval loss) has a progress bar with a time estimate."""
    from qlora_kit.progress import progress_bar

    records = tmp_path / "eval.jsonl"
    records.write_text("".join(json.dumps({"instruction": f"Say {w}.", "output": w}) + "\n" for w in ("hi", "yes")))
    merge_and_export(tiny_model_dir, tiny_adapter_dir, tmp_path / "merged", dtype="fp32", eval_file=str(records))
    err = capsys.readouterr().err
    for phase in ("verify: 4-bit + adapter", "verify: merged", "eval loss"):
        assert re.search(re.escape(phase) + r": 100%.*\[\d\d:\d\d<\d\d:\d\d", err), (phase, err[-2000:])
    merge_and_export(tiny_model_dir, tiny_adapter_dir, tmp_path / "quiet", dtype="fp32", progress=False)
    assert "verify:" not in capsys.readouterr().err
    assert progress_bar(range(3), enabled=False).disable

def test_verification_quantizes_from_the_dtype_the_adapter_was_trained_with(tiny_model_dir, tmp_path):
    """An fp32 checkpoint trained with compute bf16: the loader quantized bf16-rounded weights, and so does the
    merge (``plan.loader_dtype``); verification's reference must too, or a correct merge fails (it did, 0.037)."""
    from transformers import AutoModelForCausalLM

    from qlora_kit.merging.plan import build_plan
    from qlora_kit.merging.verify import reference_model
    from qlora_kit.model.fused import dequantize

    model, _ = _random_adapter(tiny_model_dir, tmp_path / "ad", compute_dtype="bf16")
    assert read_adapter(tmp_path / "ad").meta["compute_dtype"] == "bfloat16"
    report = merge_and_export(tiny_model_dir, tmp_path / "ad", tmp_path / "m", dtype="fp32", progress=False,
                              prompts=PROMPTS)
    v = report["verification"]
    assert v["passed"] and v["max_rel_logit_diff"] <= 1e-4 and v["generations_identical"] == 1.0, v
    # the reference's 4-bit weights are the ones training had (quantized from bf16), computed in fp32
    ref = reference_model(build_plan(tiny_model_dir, tmp_path / "ad"))
    trained, rebuilt = dict(model.named_modules()), dict(ref.named_modules())
    name = "model.layers.0.self_attn.q_proj"
    (a, sa), (b, sb) = ((m.base.weight.data, m.base.weight.quant_state) for m in (rebuilt[name], trained[name]))
    assert torch.equal(a, b)  # the same 4-bit codes, and the same scales (dequantized in fp32 on both sides):
    assert torch.equal(dequantize(a, sa, torch.float32), dequantize(b, sb, torch.float32))
    assert rebuilt["model.embed_tokens"].weight.dtype == torch.float32
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    torch.testing.assert_close(_logits(merged), _logits(ref), atol=1e-4 * _logits(ref).abs().max().item(), rtol=0)
