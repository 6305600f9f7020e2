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
from qlora_kit.model.lora import adapters_disabled, lora_layers
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


def _dpo_from_adapter(model_dir, adapter_dir, reference="auto", **training):
    """The tiny model with the adapter ``adapter_dir`` as the starting (trainable) adapter, as ``train`` sets it
    up (``start_config`` + ``add_lora`` + ``load_start_weights``), and the run's TrainingConfig."""
    from qlora_kit.config import TrainConfig
    from qlora_kit.training.start_adapter import load_start_weights, start_config

    config = TrainConfig()
    config.model.path, config.model.adapter = str(model_dir), str(adapter_dir)
    config.training.objective, config.training.dpo_reference = "dpo", reference
    for k, v in training.items():
        setattr(config.training, k, v)
    config = start_config(config, None)
    model, tok = load_tiny(model_dir)
    torch.manual_seed(0)
    add_lora(model, config.lora)
    load_start_weights(model, config)
    model.train()
    return model, tok, config.training


def test_starting_adapter_as_reference_gives_ln2_and_zero_rewards(tiny_model_dir, sft_adapter_dir):
    """model.adapter set: at step 0 the policy IS the reference (the frozen copy of the same adapter), so the
    margin is 0 exactly: loss ln 2, rewards 0. Against the base (dpo_reference=base) the same policy is not."""
    model, tok, tc = _dpo_from_adapter(tiny_model_dir, sft_adapter_dir)
    pairs, _, _ = prepare_data(DataConfig(max_seq_len=64), tok, records=RECORDS)
    batch = collate_pairs(pairs, tok.pad_token_id, 64)
    loss, stats = preference_loss(model, batch, tc, StepTotals.of([batch]))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert stats.reward_chosen == 0.0 and stats.reward_rejected == 0.0 and stats.correct == 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    base_model, _, base_tc = _dpo_from_adapter(tiny_model_dir, sft_adapter_dir, reference="base")
    loss_b, stats_b = preference_loss(base_model, batch, base_tc, StepTotals.of([batch]))
    assert abs(loss_b.item() - math.log(2)) > 1e-4 and stats_b.reward_chosen != 0
    with torch.no_grad():  # and its rewards are beta x (adapter - base) log-probs
        policy = sequence_logps(base_model, batch)[0]
        with adapters_disabled(base_model):
            base = sequence_logps(base_model, batch)[0]
    chosen = (base_tc.dpo_beta * (policy - base)).chunk(2)[0]
    assert stats_b.reward_chosen == pytest.approx(chosen.sum().item(), rel=1e-5)


def _peft_policy_with_ref_adapter(model_dir, adapter_dir):
    """transformers + bnb NF4 (fp32 compute) + PEFT: adapter "default" trainable, adapter "ref" a frozen second
    copy of the same adapter (TRL's DPOTrainer uses a PEFT adapter named "ref" as the reference model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl.trainer.utils import add_fused_lm_head

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=torch.float32,
                                                device_map="cpu")
    for module in base.modules():  # no in-place repacking for bnb's bf16 CPU kernel (FACTS.md)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    peft = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    peft.load_adapter(str(adapter_dir), adapter_name="ref")  # frozen (is_trainable=False)
    peft._trl_fused = True
    peft.train()
    return peft


def test_dpo_from_adapter_matches_trl_with_peft_ref_adapter(tiny_model_dir, sft_adapter_dir):
    """Policy moved off the starting adapter (the same nudge to B on both sides), reference = the starting
    adapter: our loss, LoRA gradients and rewards equal TRL's DPOTrainer on a PEFT model whose "ref" adapter is
    the frozen copy."""
    from trl.trainer.utils import use_adapter

    model, tok, tc = _dpo_from_adapter(tiny_model_dir, sft_adapter_dir, dpo_beta=0.3)
    peft = _peft_policy_with_ref_adapter(tiny_model_dir, sft_adapter_dir)
    g = torch.Generator().manual_seed(3)
    theirs_modules = dict(peft.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(model):
            nudge = 0.05 * torch.randn(layer.adapters["default"].lora_B.shape, generator=g)
            layer.adapters["default"].lora_B.add_(nudge)
            theirs_modules[f"base_model.model.{name}"].lora_B["default"].weight.add_(nudge)
    pairs, _, _ = prepare_data(DataConfig(max_seq_len=64), tok, records=RECORDS)
    batch = collate_pairs(pairs, tok.pad_token_id, 64)
    loss, stats, grads = _ours(model, batch, tc)

    trainer = _trl_dpo(peft, "sigmoid", beta=0.3)
    inputs = _trl_inputs(batch)
    ref_c, ref_r = trainer.compute_ref_log_probs(peft, inputs)  # under use_adapter(peft, "ref")
    with use_adapter(peft, None), torch.no_grad():  # sanity: "ref" is not the base
        base_c, _ = trainer.compute_ref_log_probs(peft, inputs)
    assert not torch.allclose(base_c, ref_c)
    peft.zero_grad(set_to_none=True)
    theirs = trainer._compute_loss(peft, {**inputs, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}, False)
    theirs.backward()
    torch.testing.assert_close(loss, theirs.detach(), rtol=1e-5, atol=1e-6)
    peft_grads = {}
    for n, p in peft.named_parameters():
        if p.grad is not None:
            module, part = n.removeprefix("base_model.model.").rsplit(".lora_", 1)
            peft_grads[f"{module}.adapters.default.lora_{part.split('.')[0]}"] = p.grad.detach().clone()
    _assert_same_grads(grads, peft_grads)
    m, trl_m = stats.means(), trainer._metrics["train"]
    assert m["reward_chosen"] == pytest.approx(trl_m["rewards/chosen"][0], rel=1e-4, abs=1e-6)
    assert m["reward_rejected"] == pytest.approx(trl_m["rewards/rejected"][0], rel=1e-4, abs=1e-6)


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


@pytest.mark.parametrize("start,cache", [(False, "live"), (True, "cache")])
def test_interrupted_and_resumed_dpo_run_is_bit_identical(tmp_path, tiny_model_dir, sft_adapter_dir, monkeypatch,
                                                         caplog, start, cache):
    """Also from model.adapter with its frozen copy as reference and the reference log-probs cached: the resumed
    run reuses the cache (checked by its key and digest, not recomputed) and ends bit-identical."""
    from qlora_kit.training import reference_cache
    from qlora_kit.training.recipe import train

    def config(name):
        c = _preference_config(tmp_path / name, tiny_model_dir, "dpo", max_steps=4, save_every=2,
                               reference_logps=cache)
        c.model.adapter = str(sft_adapter_dir) if start else ""
        return c

    straight = train(config("a"), progress=False)
    with monkeypatch.context() as m:
        _interrupt_at(m, 3)
        stopped = train(config("b"), progress=False)
    assert stopped.status == "interrupted" and stopped.steps == 3
    computed = []
    real_compute = reference_cache.compute
    monkeypatch.setattr(reference_cache, "compute", lambda *a, **k: computed.append(1) or real_compute(*a, **k))
    with caplog.at_level("INFO", logger="qlora_kit"):
        resumed = train(config("b"), resume=True, progress=False)
    assert resumed.steps == 4
    a = (straight.adapter_dir / "adapter_model.safetensors").read_bytes()
    b = (resumed.adapter_dir / "adapter_model.safetensors").read_bytes()
    assert a == b
    reference_line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("DPO reference:"))
    assert ("frozen starting adapter" in reference_line) == start
    if cache == "cache":
        assert computed == [] and any("from the cache" in r.getMessage() for r in caplog.records)
        assert (tmp_path / "b" / "run" / reference_cache.CACHE_FILE).is_file()
    else:
        assert not (tmp_path / "b" / "run" / reference_cache.CACHE_FILE).exists()


# ---------------------------------------------------------------------------------------------
# Cached reference log-probs (training/reference_cache.py)


def _nudged_policy(tiny_model_dir, sft_adapter_dir, **training):
    model, tok, tc = _dpo_from_adapter(tiny_model_dir, sft_adapter_dir, **training)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.adapters["default"].lora_B.add_(0.05 * torch.randn(layer.adapters["default"].lora_B.shape,
                                                                     generator=g))
    pairs, _, _ = prepare_data(DataConfig(max_seq_len=64), tok, records=RECORDS)
    return model, tok, tc, pairs


@pytest.mark.parametrize("cache_batch", [4, 1])
def test_cached_reference_gives_the_live_loss_and_grads(tiny_model_dir, sft_adapter_dir, cache_batch):
    """fp32: cached in the training batch's own shape, the loss and gradients equal the live ones bit for bit;
    cached one pair at a time (other padding, other matmul shapes) they agree to fp32 round-off."""
    from qlora_kit.config import TrainConfig
    from qlora_kit.training.reference_cache import ReferenceLogps, attach, compute

    model, tok, tc, pairs = _nudged_policy(tiny_model_dir, sft_adapter_dir, dpo_beta=0.3)
    config = TrainConfig()
    config.data.max_seq_len, config.training.batch_size = 64, cache_batch
    cached = ReferenceLogps(compute(model, pairs, config, tok.pad_token_id, "test"), torch.empty(0, 2))
    batch = collate_pairs(pairs, tok.pad_token_id, 64)
    live_loss, live_stats, live_grads = _ours(model, batch, tc)
    with_cache = attach([batch], [list(range(len(pairs)))], cached, "train")[0]
    loss, stats, grads = _ours(model, with_cache, tc)
    exact = cache_batch == len(pairs)
    tol = 0 if exact else 1e-6
    torch.testing.assert_close(loss, live_loss, rtol=tol, atol=tol)
    _assert_same_grads(grads, live_grads, tol=tol if exact else 1e-5)
    assert stats.means()["reward_margin"] == pytest.approx(live_stats.means()["reward_margin"], abs=1e-6)


def test_cache_file_is_checked_before_use(tmp_path):
    """Reused only with the same key and intact numbers; stale, damaged or unreadable files say why."""
    from qlora_kit.training.reference_cache import ReferenceLogps, load, save

    path = tmp_path / "reference_logps.safetensors"
    cached = ReferenceLogps(torch.randn(6, 2), torch.randn(2, 2))
    assert load(path, "k", (6, 2)) == (None, "no cache yet")
    save(path, cached, "k")
    back, why = load(path, "k", (6, 2))
    assert torch.equal(back.train, cached.train) and torch.equal(back.eval, cached.eval) and why == "reusing it"
    assert load(path, "other", (6, 2))[0] is None and "stale" in load(path, "other", (6, 2))[1]
    assert load(path, "k", (7, 2))[0] is None
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40  # one flipped bit in the numbers
    path.write_bytes(bytes(raw))
    assert load(path, "k", (6, 2))[0] is None and "damaged" in load(path, "k", (6, 2))[1]
    path.write_bytes(bytes(raw[:40]))
    assert load(path, "k", (6, 2))[0] is None and "unreadable" in load(path, "k", (6, 2))[1]


def test_damaged_cache_is_recomputed_on_resume_with_a_log_line(tmp_path, tiny_model_dir, monkeypatch, caplog):
    from qlora_kit.training.recipe import train
    from qlora_kit.training.reference_cache import CACHE_FILE

    def config():
        return _preference_config(tmp_path, tiny_model_dir, "dpo", max_steps=4, save_every=2,
                                  reference_logps="cache")

    with monkeypatch.context() as m:
        _interrupt_at(m, 2)
        train(config(), progress=False)
    cache = tmp_path / "run" / CACHE_FILE
    good = cache.read_bytes()
    raw = bytearray(good)
    raw[-1] ^= 0x01
    cache.write_bytes(bytes(raw))
    with caplog.at_level("INFO", logger="qlora_kit"):
        resumed = train(config(), resume=True, progress=False)
    assert resumed.steps == 4
    assert any("computing the cache" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    assert cache.read_bytes() == good  # recomputed: the same numbers as the first session


def test_auto_caches_only_when_the_run_visits_every_pair():
    from qlora_kit.config import TrainConfig
    from qlora_kit.training.reference_cache import use_cache

    config = TrainConfig()
    assert use_cache(config, pair_visits=100, pairs=80)[0] is True
    assert use_cache(config, pair_visits=10, pairs=80) == (False, "auto: the run visits only 10 of 80 pairs, "
                                                                  "fewer than one pass would compute")
    config.training.reference_logps = "live"
    assert use_cache(config, 100, 80)[0] is False
    config.training.reference_logps = "cache"
    assert use_cache(config, 1, 80)[0] is True


@pytest.mark.parametrize("start", [False, True])
def test_reference_equals_policy_bit_for_bit_in_bf16(tiny_model_dir, sft_adapter_dir, start):
    """16-bit compute: a grad-mode (training) forward takes the short-attention kernel, a no-grad one SDPA, and the
    two round differently. The reference (no grad) runs with the training kernels, so at step 0 (the policy is
    the reference: B = 0 over the base, or the starting adapter's frozen copy) the loss is ln 2 and the rewards
    are 0 exactly in bf16 too; with the no-grad kernels they are not."""
    from qlora_kit.config import TrainConfig
    from qlora_kit.model.attention import NAME
    from qlora_kit.training.objectives import reference_logps
    from qlora_kit.training.start_adapter import load_start_weights, start_config

    config = TrainConfig()
    config.model.path, config.training.objective = str(tiny_model_dir), "dpo"
    config.model.adapter = str(sft_adapter_dir) if start else ""
    config = start_config(config, None) if start else config
    model, tok = load_tiny(tiny_model_dir, compute_dtype="bf16")
    assert model.config._attn_implementation == NAME  # the short-attention kernel is in use for training
    add_lora(model, config.lora if start else LoraConfig(r=4, alpha=8))
    load_start_weights(model, config)
    model.train()
    pairs, _, _ = prepare_data(DataConfig(max_seq_len=64), tok, records=RECORDS)
    batch = collate_pairs(pairs, tok.pad_token_id, 64)
    loss, stats = preference_loss(model, batch, config.training, StepTotals.of([batch]))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert stats.reward_chosen == 0.0 and stats.reward_rejected == 0.0
    policy = sequence_logps(model, batch)[0].detach()  # grad mode, as in training
    assert torch.equal(reference_logps(model, batch, as_training=True), policy)
    assert not torch.equal(reference_logps(model, batch, as_training=False), policy)  # what the fix avoids
