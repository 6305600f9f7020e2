"""DPO and ORPO (training/objectives.py) against TRL's own loss code, the reference-is-the-base identity, and
gradient accumulation. Tiny 4-bit model, fp32 compute: tolerances are fp32 round-off."""
import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import load_tiny
from test_train import _interrupt_at  # the same SIGINT-after-step hook the SFT resume test uses

from qlora_kit import LoraConfig, add_lora
from qlora_kit.config import DataConfig, TrainingConfig
from qlora_kit.data.batching import collate_pairs
from qlora_kit.data.prepare import prepare_data
from qlora_kit.model.lora import adapters_disabled
from qlora_kit.training.objectives import StepTotals, preference_loss, sequence_logps

RECORDS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "The quick brown fox."},
    {"prompt": "2+2=", "chosen": "4", "rejected": "five, I think"},
    {"prompt": "Spell dog.", "chosen": "D O G", "rejected": "dog dog dog dog"},
    {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
     "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go"}]},
]


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    """The tiny 4-bit model with a rank-4 adapter whose B is random (policy != reference), and the pairs."""
    model, tok = load_tiny(tiny_model_dir)
    torch.manual_seed(0)
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0, 0.05)
    model.train()  # as in training (no dropout configured, so deterministic)
    pairs, _, _ = prepare_data(DataConfig(max_seq_len=64), tok, records=RECORDS)
    return model, tok, pairs


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _ours(model, batch, tc, totals=None):
    model.zero_grad(set_to_none=True)
    loss, stats = preference_loss(model, batch, tc, totals or StepTotals.of([batch]))
    loss.backward()
    return loss.detach(), stats, _grads(model)


def _assert_same_grads(ours: dict, theirs: dict, tol: float = 1e-5) -> None:
    assert ours.keys() == theirs.keys() and ours
    for n, g in ours.items():
        torch.testing.assert_close(g, theirs[n], rtol=tol, atol=tol, msg=n)


# ---------------------------------------------------------------------------------------------
# DPO against trl.DPOTrainer._compute_loss


def _trl_dpo(model, loss_type: str, beta: float):
    """A DPOTrainer with only the attributes ``_compute_loss`` reads, on our model with TRL's fused LM head."""
    from accelerate import Accelerator
    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    if not hasattr(model, "_trl_fused"):
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
        model._trl_fused = True
    t = DPOTrainer.__new__(DPOTrainer)
    t.__dict__.update(model=model, ref_model=None, accelerator=Accelerator(cpu=True), aux_loss_enabled=False,
                      ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                      loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
                      use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
                      _tp_size=1, args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    return t


def _trl_inputs(batch: dict) -> dict:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "completion_mask": (batch["labels"] != -100).long()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_and_grads_match_trl(setup, loss_type):
    model, tok, pairs = setup
    batch = collate_pairs(pairs, tok.pad_token_id, 64)
    tc = TrainingConfig(objective="dpo", dpo_loss=loss_type, dpo_beta=0.3)
    loss, stats, grads = _ours(model, batch, tc)

    trainer = _trl_dpo(model, loss_type, beta=0.3)
    inputs = _trl_inputs(batch)
    with adapters_disabled(model):  # TRL's reference for an adapter model is the model with adapters disabled
        ref_c, ref_r = trainer.compute_ref_log_probs(model, inputs)
    model.zero_grad(set_to_none=True)
    theirs = trainer._compute_loss(model, {**inputs, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}, False)
    theirs.backward()
    torch.testing.assert_close(loss, theirs.detach(), rtol=1e-5, atol=1e-6)
    _assert_same_grads(grads, _grads(model))
    m, trl_m = stats.means(), trainer._metrics["train"]
    assert m["reward_chosen"] != 0 and m["reward_rejected"] != 0  # the adapter moved the policy off the base
    assert m["reward_chosen"] == pytest.approx(trl_m["rewards/chosen"][0], rel=1e-4, abs=1e-6)
    assert m["reward_rejected"] == pytest.approx(trl_m["rewards/rejected"][0], rel=1e-4, abs=1e-6)
    assert m["reward_margin"] == pytest.approx(trl_m["rewards/margins"][0], rel=1e-4, abs=1e-6)
    assert m["pref_accuracy"] == pytest.approx(trl_m["rewards/accuracies"][0])


def test_dpo_label_smoothing_matches_trl_conservative_form(setup):
    """TRL 1.16 keeps the cDPO form (-(1-e) log s(bd) - e log s(-bd)) in loss "aot", which for one pair is it."""
    model, tok, pairs = setup
    batch = collate_pairs(pairs[:1], tok.pad_token_id, 64)
    loss, _, grads = _ours(model, batch, TrainingConfig(objective="dpo", dpo_beta=0.5, label_smoothing=0.2))
    trainer = _trl_dpo(model, "aot", beta=0.5)
    trainer.label_smoothing = 0.2
    inputs = _trl_inputs(batch)
    with adapters_disabled(model):
        ref_c, ref_r = trainer.compute_ref_log_probs(model, inputs)
    model.zero_grad(set_to_none=True)
    theirs = trainer._compute_loss(model, {**inputs, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}, False)
    theirs.backward()
    torch.testing.assert_close(loss, theirs.detach(), rtol=1e-5, atol=1e-6)
    _assert_same_grads(grads, _grads(model))


def test_hinge_is_relu_of_one_minus_margin(setup):
    model, tok, pairs = setup
    batch = collate_pairs(pairs, tok.pad_token_id, 64)
    tc = TrainingConfig(objective="dpo", dpo_loss="hinge", dpo_beta=2.0)
    loss, _, _ = _ours(model, batch, tc)
    with torch.no_grad():
        policy = sequence_logps(model, batch)[0]
        with adapters_disabled(model):
            ref = sequence_logps(model, batch)[0]
    c, r = (policy - ref).chunk(2)
    torch.testing.assert_close(loss, torch.relu(1 - 2.0 * (c - r)).mean(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The reference is the base


def test_zero_B_gives_ln2_and_zero_rewards(tiny_model_dir):
    """A fresh adapter (B = 0) leaves the policy equal to the base: margin 0, loss ln 2, rewards exactly 0."""
    model, tok = load_tiny(tiny_model_dir)
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    pairs, _, _ = prepare_data(DataConfig(max_seq_len=64), tok, records=RECORDS)
    batch = collate_pairs(pairs, tok.pad_token_id, 64)
    loss, stats = preference_loss(model, batch, TrainingConfig(objective="dpo"), StepTotals.of([batch]))
    assert abs(loss.item() - math.log(2)) < 1e-6
    assert stats.reward_chosen == 0.0 and stats.reward_rejected == 0.0 and stats.correct == 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())  # A is still trained


# ---------------------------------------------------------------------------------------------
# ORPO against trl.experimental.orpo.ORPOTrainer


def test_orpo_matches_trl_odds_ratio_and_logps(setup):
    """TRL's ORPO: token-mean log-probs from full logits (``get_batch_logps``) into ``odds_ratio_loss``; the NLL
    term is the chosen responses' mean token NLL (TRL's own NLL also covers the prompt tokens; ours, like our
    SFT, covers the responses only, as in the ORPO paper)."""
    from trl.experimental.orpo import ORPOTrainer

    model, tok, pairs = setup
    batch = collate_pairs(pairs, tok.pad_token_id, 64)
    loss, stats, grads = _ours(model, batch, TrainingConfig(objective="orpo", orpo_lambda=0.25))

    t = ORPOTrainer.__new__(ORPOTrainer)
    t.__dict__.update(beta=0.25, accelerator=SimpleNamespace(device=torch.device("cpu")))
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [2b, s, V]
    labels = batch["labels"]
    mean_logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)  # [2b]
    b = len(pairs)
    losses, chosen_r, rejected_r, _, _ = t.odds_ratio_loss(mean_logps[:b], mean_logps[b:])
    nll = torch.nn.functional.cross_entropy(logits[:b, :-1].flatten(0, 1), labels[:b, 1:].flatten())
    theirs = nll - losses.mean()
    theirs.backward()
    torch.testing.assert_close(loss, theirs.detach(), rtol=1e-5, atol=1e-6)
    _assert_same_grads(grads, _grads(model))
    assert stats.means()["reward_chosen"] == pytest.approx(chosen_r.mean().item(), rel=1e-5)
    assert stats.means()["pref_accuracy"] == pytest.approx((chosen_r > rejected_r).float().mean().item())


# ---------------------------------------------------------------------------------------------
# Accumulation


@pytest.mark.parametrize("objective,loss_type", [("dpo", "sigmoid"), ("dpo", "ipo"), ("orpo", "sigmoid")])
def test_accumulated_micro_batches_equal_one_big_batch(setup, objective, loss_type):
    model, tok, pairs = setup
    tc = TrainingConfig(objective=objective, dpo_loss=loss_type, dpo_beta=0.3)
    big = collate_pairs(pairs, tok.pad_token_id, 64)
    loss, stats, grads = _ours(model, big, tc)
    micro = [collate_pairs(pairs[:1], tok.pad_token_id, 64), collate_pairs(pairs[1:], tok.pad_token_id, 64)]
    totals = StepTotals.of(micro)
    assert totals == StepTotals.of([big])
    model.zero_grad(set_to_none=True)
    total, acc = 0.0, None
    for batch in micro:
        part, s = preference_loss(model, batch, tc, totals)
        part.backward()
        total += part.item()
        acc = s if acc is None else acc.add(s)
    assert total == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    _assert_same_grads(grads, _grads(model))
    for k, v in stats.means().items():
        assert acc.means()[k] == pytest.approx(v, rel=1e-5, abs=1e-7)


# ---------------------------------------------------------------------------------------------
# In the recipe: qlora-kit train with training.objective dpo / orpo


def _preference_config(tmp_path, model_dir, objective, **training):
    from qlora_kit.config import load_train_config

    tmp_path.mkdir(parents=True, exist_ok=True)
    words = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "robot"]
    rows = [{"prompt": f"Spell {w}.", "chosen": w.upper(), "rejected": w} for w in words * 2]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [f"model.path={model_dir}", f"data.train_file={data}", "data.eval_fraction=0.25",
                 "data.max_seq_len=64", "model.compute_dtype=fp32", "model.device=cpu", "lora.r=4", "lora.alpha=8",
                 f"training.output_dir={tmp_path / 'run'}", "training.batch_size=2", "training.grad_accum=2",
                 "training.optimizer=adamw", "training.lr=5e-3", "training.gradient_checkpointing=off",
                 f"training.objective={objective}"]
    return load_train_config(None, overrides + [f"training.{k}={v}" for k, v in training.items()])


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_train_runs_the_objective_and_logs_pair_metrics(tmp_path, tiny_model_dir, objective):
    from qlora_kit.training.recipe import train

    result = train(_preference_config(tmp_path, tiny_model_dir, objective, max_steps=3, eval_every=3),
                   progress=False)
    assert result.status == "completed" and (result.adapter_dir / "adapter_model.safetensors").is_file()
    lines = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "eval_loss" in r]
    for key in ("reward_chosen", "reward_rejected", "reward_margin", "pref_accuracy"):
        assert all(key in r for r in steps) and f"eval_{key}" in evals[-1]
    if objective == "dpo":  # step 1 starts at the base (B = 0): loss ln 2, rewards 0
        assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert steps[0]["reward_chosen"] == 0 and steps[0]["pref_accuracy"] == 0
        assert steps[-1]["loss"] < math.log(2)


def test_interrupted_and_resumed_dpo_run_is_bit_identical(tmp_path, tiny_model_dir, monkeypatch):
    from qlora_kit.training.recipe import train

    steps = {"max_steps": 4, "save_every": 2}
    straight = train(_preference_config(tmp_path / "a", tiny_model_dir, "dpo", **steps), progress=False)
    with monkeypatch.context() as m:
        _interrupt_at(m, 3)
        stopped = train(_preference_config(tmp_path / "b", tiny_model_dir, "dpo", **steps), progress=False)
    assert stopped.status == "interrupted" and stopped.steps == 3
    resumed = train(_preference_config(tmp_path / "b", tiny_model_dir, "dpo", **steps), resume=True, progress=False)
    assert resumed.steps == 4
    a = (straight.adapter_dir / "adapter_model.safetensors").read_bytes()
    b = (resumed.adapter_dir / "adapter_model.safetensors").read_bytes()
    assert a == b
