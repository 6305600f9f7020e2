"""Dynamic-rank (QDyLoRA) LoRA: truncation equals the exported rank-k adapter (ours and PEFT's loader), the
sampled ranks reproduce and survive resume, sampling off at r_max is ordinary LoRA, merge at rank k, and the
rank sweep."""
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import load_tiny
from safetensors import safe_open
from test_train import _config, _interrupt_at

from qlora_kit import LoraConfig, add_lora, load_adapter, merge_and_export, save_adapter
from qlora_kit.config import ConfigError
from qlora_kit.model.adapters import read_adapter
from qlora_kit.model.lora import lora_layers, sample_rank, set_rank
from qlora_kit.training.recipe import train
from qlora_kit.training.step import step_seed

IDS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _dynamic_model(base, r=8, alpha=16.0, seed=0, **lora):
    """A dynamic-rank adapter with random B (a trained-looking, non-trivial update at every rank)."""
    model, tok = load_tiny(base)
    torch.manual_seed(seed)
    add_lora(model, LoraConfig(r=r, alpha=alpha, dynamic_rank=True, r_min=1, **lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for a in layer.adapters.values():
                a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.2)
    return model, tok


def _tensors(path):
    with safe_open(str(Path(path) / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def dynamic_dir(tiny_model_dir, tmp_path_factory):
    """A saved dynamic adapter (r_max=8, alpha=16) and its logits at ranks 1, 3, 8."""
    model, _ = _dynamic_model(tiny_model_dir)
    path = tmp_path_factory.mktemp("dyn") / "ad"
    save_adapter(model, path)
    logits = {}
    for k in (1, 3, 8):
        set_rank(model, k)
        logits[k] = _logits(model)
    return path, logits


def test_scale_is_alpha_over_active_rank_on_truncated_factors(tiny_model_dir):
    model, _ = _dynamic_model(tiny_model_dir, use_rslora=False)
    _, layer = next(iter(lora_layers(model)))
    a = layer.adapters["default"]
    x = torch.randn(3, a.lora_A.shape[1])
    for k in (1, 5, 8):
        a.rank = k
        expected = x @ a.lora_A[:k].t() @ a.lora_B[:, :k].t() * (16.0 / k)  # QDyLoRA: (alpha/b) B[:, :b] A[:b]
        torch.testing.assert_close(a(x), expected)
        torch.testing.assert_close(a.delta_weight(), a.lora_B[:, :k] @ a.lora_A[:k] * (16.0 / k))


@pytest.mark.parametrize("k", [1, 3])
def test_truncated_adapter_equals_exported_rank_k_adapter_ours_and_peft(tiny_model_dir, dynamic_dir, tmp_path, k):
    path, logits = dynamic_dir
    model, _ = load_tiny(tiny_model_dir)
    load_adapter(model, path, rank=k)  # the full dynamic adapter, run at rank k
    torch.testing.assert_close(_logits(model), logits[k], atol=1e-6, rtol=0)
    save_adapter(model, tmp_path / f"r{k}", rank=k)

    cfg = json.loads((tmp_path / f"r{k}" / "adapter_config.json").read_text())
    assert cfg["r"] == k and cfg["lora_alpha"] == 16.0  # an ordinary rank-k LoRA: scale lora_alpha / r = alpha / k
    assert all(t.shape[0] == k or t.shape[1] == k for t in _tensors(tmp_path / f"r{k}").values())

    fresh, _ = load_tiny(tiny_model_dir)
    load_adapter(fresh, tmp_path / f"r{k}")
    torch.testing.assert_close(_logits(fresh), logits[k], atol=1e-6, rtol=0)

    peft = pytest.importorskip("peft")
    base, _ = load_tiny(tiny_model_dir)
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / f"r{k}"))
    torch.testing.assert_close(_logits(peft_model), logits[k], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[k], logits[8], atol=1e-3)  # the ranks really differ


def test_load_adapter_uses_active_rank_by_default_full_rank_otherwise(tiny_model_dir, dynamic_dir, tmp_path):
    path, logits = dynamic_dir
    model, _ = load_tiny(tiny_model_dir)
    load_adapter(model, path)
    torch.testing.assert_close(_logits(model), logits[8], atol=1e-6, rtol=0)  # active_rank 0: r_max

    trained, _ = _dynamic_model(tiny_model_dir, active_rank=3)
    save_adapter(trained, tmp_path / "a3")
    assert read_adapter(tmp_path / "a3").config.active_rank == 3
    again, _ = load_tiny(tiny_model_dir)
    load_adapter(again, tmp_path / "a3")
    torch.testing.assert_close(_logits(again), logits[3], atol=1e-6, rtol=0)
    set_rank(again, 1)
    torch.testing.assert_close(_logits(again), logits[1], atol=1e-6, rtol=0)

    plain, _ = load_tiny(tiny_model_dir)
    add_lora(plain, LoraConfig(r=4))
    save_adapter(plain, tmp_path / "plain")
    with pytest.raises(ConfigError, match="not a dynamic-rank adapter"):
        load_adapter(load_tiny(tiny_model_dir)[0], tmp_path / "plain", rank=2)
    with pytest.raises(ConfigError, match="active_rank"):
        LoraConfig(r=4, active_rank=5).validate()


def test_merge_at_rank_k_equals_merge_of_exported_rank_k_adapter(tiny_model_dir, dynamic_dir, tmp_path):
    path, _ = dynamic_dir
    model, _ = load_tiny(tiny_model_dir)
    load_adapter(model, path)
    save_adapter(model, tmp_path / "r3", rank=3)
    kw = dict(dtype="fp32", verify=False, progress=False, prompts=["Hello"])
    merge_and_export(tiny_model_dir, path, tmp_path / "m_dyn", rank=3, **kw)
    merge_and_export(tiny_model_dir, tmp_path / "r3", tmp_path / "m_r3", **kw)
    from test_merge import _tensors as merged_tensors

    a, b = merged_tensors(tmp_path / "m_dyn"), merged_tensors(tmp_path / "m_r3")
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sampled_ranks_reproduce_exactly_and_cover_the_range(tmp_path, tiny_model_dir):
    def ranks(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [r["rank"] for r in map(json.loads, lines) if "loss" in r]

    for name in ("a", "b"):
        cfg = _config(tmp_path / name, tiny_model_dir, max_steps=8)
        cfg.lora.dynamic_rank, cfg.lora.r, cfg.lora.r_min = True, 8, 2
        train(cfg, progress=False)
    first, second = ranks(tmp_path / "a" / "run"), ranks(tmp_path / "b" / "run")
    assert first == second and len(first) == 8 and len(set(first)) > 2
    assert all(2 <= k <= 8 for k in first)
    cfg = LoraConfig(r=8, r_min=2, dynamic_rank=True)
    assert first == [sample_rank(random.Random(step_seed(42, s)), cfg) for s in range(8)]


def test_log_uniform_sampling_stays_in_range_and_favours_small_ranks():
    cfg = LoraConfig(r=32, r_min=1, dynamic_rank=True, rank_sampling="log_uniform")
    rng = random.Random(0)
    draws = [sample_rank(rng, cfg) for _ in range(4000)]
    assert min(draws) == 1 and max(draws) == 32
    small, large = sum(d < 4 for d in draws), sum(8 <= d < 32 for d in draws)
    assert abs(small - large) < 0.1 * len(draws)  # equal mass per factor of 4 (uniform would give 94 vs 750)
    with pytest.raises(ConfigError, match="rank_sampling"):
        LoraConfig(rank_sampling="beta").validate()


def test_exact_resume_holds_with_dynamic_rank(tmp_path, tiny_model_dir, monkeypatch):
    def cfg(name):
        c = _config(tmp_path / name, tiny_model_dir, max_steps=6, save_every=2)
        c.lora.dynamic_rank, c.lora.r_min = True, 1
        return c

    straight = train(cfg("a"), progress=False)
    with monkeypatch.context() as m:
        _interrupt_at(m, 3)
        stopped = train(cfg("b"), progress=False)
    assert stopped.status == "interrupted" and stopped.steps == 3
    resumed = train(cfg("b"), resume=True, progress=False)
    assert resumed.steps == 6
    a = (straight.adapter_dir / "adapter_model.safetensors").read_bytes()
    b = (resumed.adapter_dir / "adapter_model.safetensors").read_bytes()
    assert a == b
    ranks = lambda run: [r.get("rank") for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]  # noqa: E731
    assert ranks(tmp_path / "a" / "run") == ranks(tmp_path / "b" / "run")


def test_full_rank_without_sampling_is_ordinary_lora(tmp_path, tiny_model_dir):
    plain = train(_config(tmp_path / "plain", tiny_model_dir, max_steps=4), progress=False)
    c = _config(tmp_path / "dyn", tiny_model_dir, max_steps=4)
    c.lora.dynamic_rank, c.lora.r_min = True, c.lora.r  # r_min == r: every step samples r_max
    dyn = train(c, progress=False)
    a, b = _tensors(plain.adapter_dir), _tensors(dyn.adapter_dir)
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert json.loads((dyn.adapter_dir / "adapter_config.json").read_text()) == \
        json.loads((plain.adapter_dir / "adapter_config.json").read_text())
    assert dyn.eval_loss == plain.eval_loss


def test_rank_sweep_recommends_the_smallest_rank_within_tolerance(tiny_model_dir, dynamic_dir, tmp_path):
    from qlora_kit.cli import main
    from qlora_kit.inference.rank_sweep import SweepRow, recommend

    rows = [SweepRow(1, 2.0), SweepRow(2, 1.03), SweepRow(4, 1.0), SweepRow(8, 1.01)]
    assert recommend(rows, 0.02) == 4 and recommend(rows, 0.05) == 2 and recommend(rows, 1.5) == 1
    rows_em = [SweepRow(2, 1.0, 0.5), SweepRow(4, 1.0, 0.8), SweepRow(8, 1.0, 0.81)]
    assert recommend(rows_em, 0.02) == 4

    path, _ = dynamic_dir
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Spell {w}.", "output": w.upper()}) + "\n"
                            for w in ("apple", "river", "stone", "cloud")))
    out = tmp_path / "sweep"
    code = main(["rank-sweep", "--adapter", str(path), "--data", str(data), "--model", str(tiny_model_dir),
                 "--ranks", "1,2,8", "--compute-dtype", "fp32", "--out", str(out), "--max-seq-len", "64",
                 "--task-metric", "exact_match", "--export", str(tmp_path / "chosen")])
    assert code == 0
    report = json.loads((out / "rank_sweep.json").read_text())
    assert [r["rank"] for r in report["rows"]] == [1, 2, 8] and report["recommended"] in (1, 2, 8)
    assert all(r["exact_match"] is not None for r in report["rows"])
    assert (out / "rank_sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "chosen" / "adapter_config.json").read_text())["r"] == report["recommended"]
    assert main(["rank-sweep", "--adapter", str(path), "--data", str(data), "--model", str(tiny_model_dir),
                 "--ranks", "16"]) == 2  # above r_max: a one-line error
