"""Pair metrics of dpo/orpo runs (rewards of chosen and rejected, margin, preference accuracy) in metrics.jsonl,
summary.json, the progress bar and loss.png, checked against rewards computed independently: plain torch
log-softmax over the full logits of the saved checkpoints (adapters disabled for the DPO reference).
Tiny 4-bit model, fp32 compute."""
import json
import math

import pytest
import torch
from conftest import load_tiny
from test_distributed import _launch, _ok, _overrides

from qlora_kit import LoraConfig, add_lora
from qlora_kit.config import DataConfig, TrainingConfig, load_train_config
from qlora_kit.data import IGNORE_INDEX
from qlora_kit.data.batching import collate_pairs
from qlora_kit.data.prepare import prepare_data
from qlora_kit.model.adapters import assign_adapter
from qlora_kit.model.lora import adapters_disabled
from qlora_kit.training.checkpoint import read_checkpoint_adapter

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "robot", "sugar", "house", "train", "grass"]
KEYS = ("reward_chosen", "reward_rejected", "reward_margin", "pref_accuracy")


def _pairs(words):
    return [{"prompt": f"Spell {w}.", "chosen": w.upper(), "rejected": w} for w in words]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _summed_logps(model, batch) -> torch.Tensor:
    """Each row's summed log-prob of its supervised tokens ``[rows]``, from the full logits (no chunking)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()  # [rows, s, V]
    labels = batch["labels"][:, 1:]  # [rows, s-1]
    mask = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(dim=1), mask.sum(dim=1)


@torch.no_grad()
def _independent_means(model, pairs, pad_id, tc: TrainingConfig) -> dict:
    """The pair metrics of ``pairs`` under the model's current adapter, computed from scratch."""
    batch = collate_pairs(pairs, pad_id, 64)
    policy, tokens = _summed_logps(model, batch)  # [2b], [2b]
    if tc.objective == "dpo":
        with adapters_disabled(model):
            reference, _ = _summed_logps(model, batch)
        rewards = tc.dpo_beta * (policy - reference)
    else:
        rewards = tc.orpo_lambda * policy / tokens
    chosen, rejected = rewards.chunk(2)
    return {"reward_chosen": chosen.mean().item(), "reward_rejected": rejected.mean().item(),
            "reward_margin": (chosen - rejected).mean().item(), "pref_accuracy": (chosen > rejected).float().mean().item()}


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_logged_pair_metrics_equal_rewards_computed_from_the_checkpoints(tmp_path, tiny_model_dir, objective, capsys):
    """Train step s's metrics are those of the whole (one-batch) training set under checkpoint s-1 (the base at
    s = 1); evaluation at step s under checkpoint s; summary.json holds the last evaluation's."""
    from qlora_kit.training.recipe import train

    train_rows, eval_rows = _pairs(WORDS[:8]), _pairs(WORDS[8:])
    overrides = [f"model.path={tiny_model_dir}", f"data.train_file={_write(tmp_path / 'train.jsonl', train_rows)}",
                 f"data.eval_file={_write(tmp_path / 'eval.jsonl', eval_rows)}", "data.max_seq_len=64",
                 "model.compute_dtype=fp32", "model.device=cpu", "lora.r=4", "lora.alpha=8",
                 f"training.output_dir={tmp_path / 'run'}", "training.batch_size=8", "training.optimizer=adamw",
                 "training.lr=5e-3", "training.gradient_checkpointing=off", f"training.objective={objective}",
                 "training.dpo_beta=0.2", "training.orpo_lambda=0.3", "training.max_steps=3", "training.eval_every=2",
                 "training.save_every=1", "training.keep_checkpoints=3"]
    config = load_train_config(None, overrides)
    result = train(config, progress=True)
    bar = capsys.readouterr().err
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "loss" in r}
    evals = {r["step"]: r for r in records if "eval_loss" in r}
    assert sorted(steps) == [1, 2, 3] and sorted(evals) == [2, 3]

    model, tok = load_tiny(tiny_model_dir)
    torch.manual_seed(0)
    add_lora(model, LoraConfig(r=4, alpha=8))
    model.eval()
    train_pairs, _, _ = prepare_data(DataConfig(max_seq_len=64), tok, records=train_rows)
    eval_pairs, _, _ = prepare_data(DataConfig(max_seq_len=64), tok, records=eval_rows)
    ckpt = result.output_dir / "checkpoints"
    for s in (1, 2, 3):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad and s == 1:
                    p.zero_()  # B = 0: the base (A does not matter then)
        if s > 1:
            assign_adapter(model, read_checkpoint_adapter(ckpt / f"step-{s - 1:06d}"))
        want = _independent_means(model, train_pairs, tok.pad_token_id, config.training)
        for k in KEYS:
            assert steps[s][k] == pytest.approx(want[k], abs=2e-5), (s, k)
        if s in evals:
            assign_adapter(model, read_checkpoint_adapter(ckpt / f"step-{s:06d}"))
            want = _independent_means(model, eval_pairs, tok.pad_token_id, config.training)
            for k in KEYS:
                assert evals[s][f"eval_{k}"] == pytest.approx(want[k], abs=2e-5), (s, k)
    assert evals[3]["eval_pref_accuracy"] > 0 and evals[3]["eval_reward_margin"] > 0  # it learned the rule
    summary = json.loads((result.output_dir / "summary.json").read_text())
    assert summary["eval_pairs"] == {f"eval_{k}": evals[3][f"eval_{k}"] for k in KEYS}
    last = steps[3]
    assert f"r+={last['reward_chosen']:.3f}" in bar and f"r-={last['reward_rejected']:.3f}" in bar
    assert f"margin={last['reward_margin']:.3f}" in bar and f"acc={last['pref_accuracy']:.2f}" in bar


def test_sft_summary_has_no_pair_metrics(tmp_path, tiny_model_dir):
    from qlora_kit.training.recipe import train

    rows = [{"instruction": f"Spell {w}.", "input": "", "output": w.upper()} for w in WORDS]
    config = load_train_config(None, [
        f"model.path={tiny_model_dir}", f"data.train_file={_write(tmp_path / 'sft.jsonl', rows)}",
        "data.eval_fraction=0.25", "data.max_seq_len=64", "model.compute_dtype=fp32", "model.device=cpu",
        "lora.r=4", f"training.output_dir={tmp_path / 'run'}", "training.batch_size=4", "training.max_steps=1",
        "training.optimizer=adamw", "training.gradient_checkpointing=off"])
    result = train(config, progress=False)
    assert json.loads((result.output_dir / "summary.json").read_text())["eval_pairs"] is None


def _plotted(tmp_path, monkeypatch, records, tc):
    from qlora_kit.training import metrics

    figures = []
    monkeypatch.setattr(metrics, "save_figure", lambda fig, out: figures.append(fig) or out)
    (tmp_path / "my-run").mkdir()
    log = metrics.MetricsLog(tmp_path / "my-run" / "metrics.jsonl")
    for r in records:
        log.write(r)
    log.plot(tmp_path / "my-run" / "loss.png", tc)
    return figures[0]


def test_loss_png_of_a_dpo_run_has_a_labelled_pair_panel(tmp_path, monkeypatch):
    pair = {"reward_chosen": 0.2, "reward_rejected": -0.1, "reward_margin": 0.3, "pref_accuracy": 0.75}
    records = [{"step": 1, "loss": math.log(2), **{k: 0.0 for k in pair}}, {"step": 2, "loss": 0.5, **pair},
               {"step": 2, "eval_loss": 0.6, **{f"eval_{k}": v for k, v in pair.items()}}]
    fig = _plotted(tmp_path, monkeypatch, records, TrainingConfig(objective="dpo"))
    loss_ax, pair_ax, acc_ax = fig.axes
    assert "DPO loss" in loss_ax.get_ylabel() and "nats per pair" in loss_ax.get_ylabel()
    assert "my-run" in pair_ax.get_title() and "preference accuracy" in pair_ax.get_title()
    assert pair_ax.get_xlabel() == "optimizer step"
    assert "β·log(π/π_ref)" in pair_ax.get_ylabel() and "(nats)" in pair_ax.get_ylabel()
    assert "%" in acc_ax.get_ylabel()
    lines = {line.get_label(): line for line in pair_ax.get_lines() + acc_ax.get_lines()}
    assert list(lines["margin (train)"].get_ydata()) == [0.0, 0.3]
    assert list(lines["accuracy (validation)"].get_ydata()) == [75.0]
    assert {"chosen (train)", "rejected (train)", "chosen (validation)", "rejected (validation)"} <= set(lines)


def test_loss_png_of_an_sft_run_has_one_panel(tmp_path, monkeypatch):
    fig = _plotted(tmp_path, monkeypatch, [{"step": 1, "loss": 2.0}], None)
    assert len(fig.axes) == 1 and "nats per supervised token" in fig.axes[0].get_ylabel()


def test_two_processes_log_the_pair_metrics_of_the_whole_step(tmp_path, tiny_model_dir):
    """DDP: each rank sees half the pairs; the logged rewards and accuracy are over all of them, as on one
    process with double accumulation."""
    _write(tmp_path / "toy.jsonl", _pairs(WORDS * 2))  # _overrides trains on tmp/toy.jsonl
    extra = {"objective": "dpo", "lr": 2e-2}
    two = _launch(tmp_path, _overrides(tmp_path, tiny_model_dir, tmp_path / "two", **extra))
    one = _launch(tmp_path, _overrides(tmp_path, tiny_model_dir, tmp_path / "one", grad_accum=2, **extra), nproc=1)
    _ok(two[0]), _ok(one[0])
    runs = [[json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("two", "one")]
    assert len(runs[0]) == len(runs[1]) == 3
    for a, b in zip(*runs):
        for k in KEYS:
            assert a[k] == pytest.approx(b[k], abs=1e-5), (a["step"], k)
    assert runs[0][-1]["reward_margin"] != 0  # step 3 ran on a trained adapter
