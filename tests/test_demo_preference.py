"""The demo's preference task (qlora_kit/demo/preference.py) and scripts/demo_preference.py, on the tiny model."""
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import load_tiny
from test_pair_metrics import _summed_logps

from qlora_kit.config import ConfigError, DataConfig, ModelConfig
from qlora_kit.data.batching import collate_pairs
from qlora_kit.data.prepare import prepare_data
from qlora_kit.demo.preference import (
    follows_rule,
    make_preference_dataset,
    measure,
    pair_logps,
    preference_config,
    upper_city,
)
from qlora_kit.demo.task import make_demo_dataset, user_content
from qlora_kit.model.adapters import load_adapter
from qlora_kit.model.lora import adapters_disabled

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "demo_preference.py"
HAS_START_ADAPTER = "adapter" in {f.name for f in dataclasses.fields(ModelConfig)}


def _script():
    spec = importlib.util.spec_from_file_location("demo_preference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chosen_is_the_sft_answer_with_the_city_in_capitals():
    train, held_out = make_preference_dataset(20, 10)
    records, _ = make_demo_dataset(20, 10, seed=20)
    for pair, rec in zip(train, records):
        assert pair["prompt"] == user_content(rec) and pair["rejected"] == rec["output"]
        last, first, date, city = rec["output"].split(",")
        assert pair["chosen"] == f"{last},{first},{date},{city.upper()}"
        assert follows_rule(pair["chosen"]) and not follows_rule(pair["rejected"])
    assert make_preference_dataset(20, 10) == (train, held_out)  # deterministic
    people = lambda pairs: {tuple(p["rejected"].split(",")[:2]) for p in pairs}  # noqa: E731
    assert not people(train) & people(held_out)
    assert upper_city("Lopez,Maria,1987-03-05,Rio de Janeiro") == "Lopez,Maria,1987-03-05,RIO DE JANEIRO"


@pytest.mark.parametrize("text,ok", [("Lopez,Maria,1987-03-05,LYON", True), ("Lopez,Maria,1987-03-05,LYON.", True),
                                     ("Lopez,Maria,1987-03-05,Lyon", False), ("LOPEZ,MARIA,LYON", False),
                                     ("Lopez,Maria,1987-03-05,", False), ("Maria was born in LYON", False)])
def test_follows_rule(text, ok):
    assert follows_rule(text) is ok


def test_measure_matches_an_independent_log_prob_computation(tiny_model_dir, tiny_adapter_dir):
    """pair_logps/measure against full-logits log-softmax; the reward accuracy against the base as reference."""
    model, tok = load_tiny(tiny_model_dir)
    load_adapter(model, tiny_adapter_dir, name="start")
    _, pairs = make_preference_dataset(0, 6)
    ours = pair_logps(model, tok, pairs, batch_size=4)  # [6, 2]
    examples, _, _ = prepare_data(DataConfig(format="preference", max_seq_len=256), tok, records=pairs)
    with torch.no_grad():
        policy, _ = _summed_logps(model, collate_pairs(examples, tok.pad_token_id, 256))
        with adapters_disabled(model):
            base, _ = _summed_logps(model, collate_pairs(examples, tok.pad_token_id, 256))
    want = torch.stack(policy.chunk(2), dim=1)  # [6, 2]
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-4)
    got = measure(model, tok, pairs, reference=[], max_new_tokens=4, batch_size=3)
    margin = want[:, 0] - want[:, 1]
    assert got["pref_accuracy"] == pytest.approx((margin > 0).float().mean().item())
    gap = margin - (base.chunk(2)[0] - base.chunk(2)[1])
    assert got["reward_accuracy"] == pytest.approx((gap > 0).float().mean().item())
    assert got["reward_margin"] == pytest.approx(gap.mean().item(), abs=1e-4)
    assert got["exact_match_chosen"] == 0.0 and len(got["examples"]) == 5  # a random tiny model


@pytest.mark.skipif(HAS_START_ADAPTER, reason="model.adapter exists: the start from an SFT adapter works")
def test_starting_from_an_adapter_needs_model_adapter(tmp_path, tiny_model_dir, tiny_adapter_dir, capsys):
    """Until qlora-kit has model.adapter, --sft-adapter stops before any work with a one-line error."""
    with pytest.raises(ConfigError, match="no model.adapter setting"):
        preference_config(tiny_model_dir, Path("t"), Path("e"), tmp_path, tiny_adapter_dir, {})
    code = _script().main(["--sft-adapter", str(tiny_adapter_dir), "--model", str(tiny_model_dir),
                           "--out", str(tmp_path / "out"), "--compute-dtype", "fp32"])
    assert code == 2 and "no model.adapter setting" in capsys.readouterr().err
    assert not (tmp_path / "out" / "run").exists()


def _run_script(tmp_path, tiny_model_dir, *start):
    return _script().run(_script().parse_args([
        *start, "--model", str(tiny_model_dir), "--out", str(tmp_path / "out"), "--train", "16", "--eval", "6",
        "--batch", "4", "--max-steps", "3", "--lr", "2e-2", "--max-new-tokens", "4", "--compute-dtype", "fp32"]))


def test_script_from_the_base_writes_a_before_after_report(tmp_path, tiny_model_dir, capsys):
    report = _run_script(tmp_path, tiny_model_dir, "--from-base")
    assert report == json.loads((tmp_path / "out" / "preference_report.json").read_text())
    before, after = report["before"], report["after"]
    assert report["steps"] == 3 and "reward_accuracy" in after and "reward_accuracy" not in before
    assert after["logp_margin"] > before["logp_margin"]  # DPO moved the held-out preference toward chosen
    assert report["eval_pairs"]["eval_reward_margin"] == pytest.approx(after["reward_margin"] * 0.1, abs=1e-4)
    out = capsys.readouterr().out
    assert "preference accuracy" in out and "before" in out and "after" in out


@pytest.mark.skipif(not HAS_START_ADAPTER, reason="needs model.adapter (start from an SFT adapter)")
def test_script_from_an_sft_adapter(tmp_path, tiny_model_dir, tiny_adapter_dir):
    report = _run_script(tmp_path, tiny_model_dir, "--sft-adapter", str(tiny_adapter_dir))
    assert report["start"] == str(tiny_adapter_dir)
    assert report["after"]["logp_margin"] > report["before"]["logp_margin"]
    # step 1 starts at the SFT adapter, which is also the reference: rewards 0
    first = json.loads((tmp_path / "out" / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["reward_chosen"] == 0 and first["reward_rejected"] == 0
