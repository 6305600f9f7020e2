"""The training loop: accumulation equals one big batch, exact resume, learning, NaN handling, outputs."""
import json
import os
import signal

import pytest
import torch
from conftest import load_tiny

from qlora_kit import LoraConfig, add_lora
from qlora_kit.config import load_train_config
from qlora_kit.data.batching import collate
from qlora_kit.data.tokenize import Example
from qlora_kit.model.lora import lora_layers
from qlora_kit.training.recipe import train
from qlora_kit.training.run import TrainingError
from qlora_kit.training.step import SupervisedLoss, accumulate_gradients


def _write_toy_data(path, n=48):
    """A learnable toy task: the answer is the instruction's word reversed, letter by letter."""
    words = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "robot", "sugar", "house", "train", "grass"]
    rows = []
    for i in range(n):
        w = words[i % len(words)]
        rows.append({"instruction": f"Spell {w} in capitals.", "input": "" if i % 2 else "please", "output": w.upper()})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path, model_dir, **training):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = _write_toy_data(tmp_path / "toy.jsonl")
    overrides = [f"model.path={model_dir}", f"data.train_file={data}", "data.eval_fraction=0.25",
                 "data.max_seq_len=64", "model.compute_dtype=fp32", "model.device=cpu", "lora.r=4", "lora.alpha=8",
                 f"training.output_dir={tmp_path / 'run'}", "training.batch_size=4", "training.optimizer=adamw",
                 "training.lr=5e-3", "training.gradient_checkpointing=off"]
    overrides += [f"training.{k}={v}" for k, v in training.items()]
    return load_train_config(None, overrides)


def _examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 + int(torch.randint(0, 10, (1,), generator=g))
        ids = torch.randint(5, 300, (length,), generator=g).tolist()
        cut = 2 + i % 3
        out.append(Example(input_ids=ids, labels=[-100] * cut + ids[cut:]))
    return out


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accumulation_over_micro_batches_equals_one_big_batch(tiny_model_dir):
    from accelerate import Accelerator

    model, tok = load_tiny(tiny_model_dir)
    torch.manual_seed(0)
    add_lora(model, LoraConfig(r=4))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.adapters["default"].lora_B.normal_(0, 0.1)
    acc, step_fn = Accelerator(cpu=True), SupervisedLoss(model, chunk_size=5)
    examples = _examples(6)
    pad = tok.pad_token_id
    big = [collate(examples, pad, False, 64)]
    micro = [collate(examples[:1], pad, False, 64), collate(examples[1:4], pad, False, 64),
             collate(examples[4:], pad, False, 64)]
    tokens = int((big[0]["labels"][:, 1:] != -100).sum())
    assert tokens == sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)

    loss_big = accumulate_gradients(step_fn, acc, big, tokens)
    g_big = _grads(model)
    model.zero_grad(set_to_none=True)
    loss_micro = accumulate_gradients(step_fn, acc, micro, tokens)
    g_micro = _grads(model)
    assert loss_big == pytest.approx(loss_micro, rel=1e-5)
    for n in g_big:
        torch.testing.assert_close(g_micro[n], g_big[n], atol=1e-6, rtol=1e-4)

    # the usual bug: averaging per-micro-batch means gives a different gradient
    model.zero_grad(set_to_none=True)
    for b in micro:
        (step_fn(**b) / int((b["labels"][:, 1:] != -100).sum()) / len(micro)).backward()
    g_naive = _grads(model)
    assert max((g_naive[n] - g_big[n]).abs().max().item() for n in g_big) > 1e-4


@pytest.fixture(scope="module")
def learnable_model_dir(tmp_path_factory):
    """A tiny Llama with larger init: at std 0.02 a 64-wide head cannot express sharp predictions at all."""
    from qlora_kit.testing.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("learnable"), initializer_range=0.3)


def test_tiny_run_learns_and_writes_outputs(tmp_path, learnable_model_dir):
    config = _config(tmp_path, learnable_model_dir, max_steps=30, eval_every=10, warmup_steps=2, lr=2e-2)
    result = train(config, progress=False)
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert result.status == "completed" and result.steps == 30
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    assert any("eval_loss" in r for r in records) and result.best_eval_loss is not None
    for f in ("loss.png", "summary.json", "config.yaml", "run_info.json", "adapter/adapter_model.safetensors",
              "adapter/adapter_config.json", "best_adapter/adapter_config.json"):
        assert (run / f).is_file(), f
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def _interrupt_at(monkeypatch, step):
    """Deliver SIGINT to ourselves right after optimizer step ``step`` is logged."""
    from qlora_kit.training import metrics

    original = metrics.MetricsLog.write

    def write(self, record):
        original(self, record)
        if record.get("step") == step and "loss" in record:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(metrics.MetricsLog, "write", write)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, tiny_model_dir, monkeypatch, optimizer):
    # with the generation metric in the loop (greedy exact match at steps 2, 4, 6) choosing best_adapter/
    steps = dict(max_steps=6, save_every=2, optimizer=optimizer, eval_every=2, eval_generate_every=2,
                 best_metric="eval_exact_match")
    straight = train(_config(tmp_path / "a", tiny_model_dir, **steps), progress=False)

    with monkeypatch.context() as m:
        _interrupt_at(m, 3)
        stopped = train(_config(tmp_path / "b", tiny_model_dir, **steps), progress=False)
    assert stopped.status == "interrupted" and stopped.steps == 3 and stopped.adapter_dir is None
    with pytest.raises(Exception, match="--resume"):
        train(_config(tmp_path / "b", tiny_model_dir, **steps), progress=False)
    resumed = train(_config(tmp_path / "b", tiny_model_dir, **steps), resume=True, progress=False)
    assert resumed.steps == 6
    a = (straight.adapter_dir / "adapter_model.safetensors").read_bytes()
    b = (resumed.adapter_dir / "adapter_model.safetensors").read_bytes()
    assert a == b
    for name in ("a", "b"):
        assert (tmp_path / name / "run" / "best_adapter" / "adapter_model.safetensors").read_bytes() == \
            (tmp_path / "a" / "run" / "best_adapter" / "adapter_model.safetensors").read_bytes()
    evals = [[r for r in map(json.loads, (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines())
              if "eval_exact_match" in r] for name in ("a", "b")]
    assert evals[0] == evals[1] and [r["step"] for r in evals[0]] == [2, 4, 6] and "eval_loss" in evals[0][0]
    assert (straight.best_step, straight.best_exact_match, straight.best_eval_loss, straight.eval_exact_match) == \
        (resumed.best_step, resumed.best_exact_match, resumed.best_eval_loss, resumed.eval_exact_match)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    import qlora_kit.training.step as train_mod

    calls = {"n": 0}
    real = train_mod.causal_lm_loss

    def poisoned(model, batch, chunk):
        calls["n"] += 1
        loss, n = real(model, batch, chunk)
        return (loss * float("nan") if calls["n"] == 3 else loss), n

    monkeypatch.setattr(train_mod, "causal_lm_loss", poisoned)
    config = _config(tmp_path, tiny_model_dir, max_steps=5, save_every=1)
    with pytest.raises(TrainingError, match="step 3") as e:
        train(config, progress=False)
    assert "step-000002" in str(e.value)
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "trainer_state.json").is_file()

    calls["n"] = 0
    skip = _config(tmp_path / "skip", tiny_model_dir, max_steps=5, on_nonfinite="skip")
    assert train(skip, progress=False).status == "completed"


def test_gradient_checkpointing_auto_follows_the_memory_plan(tmp_path, tiny_model_dir, monkeypatch):
    import torch

    import qlora_kit.hardware as hardware
    from qlora_kit.training.setup import choose_gradient_checkpointing

    config = _config(tmp_path, tiny_model_dir, gradient_checkpointing="auto")
    cpu = torch.device("cpu")
    assert choose_gradient_checkpointing(config, tiny_model_dir, 64, cpu) is False  # a tiny plan fits in RAM
    monkeypatch.setattr(hardware, "available_memory", lambda device: 1024)
    assert choose_gradient_checkpointing(config, tiny_model_dir, 64, cpu) is True
