"""Multi-process training on CPU: 2 processes over gloo, launched with torchrun like a user would.

Each launch runs ``qlora_kit``'s CLI through a small wrapper script (written to tmp, never shipped) that
records, from inside every rank, which examples it trained on and which files it wrote under the run
folder, and can make one rank raise at a given step.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from qlora_kit.config import load_train_config
from qlora_kit.training.recipe import train
from qlora_kit.training.run import TrainingError

LAUNCH_TIMEOUT = 150  # seconds per launch; a hang fails the test instead of blocking CI
ATOL = 1e-6  # adapters of 1 vs 2 processes differ only by float summation order (fp32 compute)

WRAPPER = r'''
import builtins, json, os, sys
rank, out = os.environ.get("RANK", "0"), os.environ["QLK_TEST_OUT"]
record = os.path.join(os.environ["QLK_TEST_LOG"], f"rank{rank}.json")
seen, writes = [], set()

def note(path):
    path = os.path.abspath(os.fspath(path))
    if path.startswith(out):
        writes.add(os.path.relpath(path, out))

real_open, real_replace, real_mkdir = builtins.open, os.replace, os.mkdir
def open_(file, mode="r", *a, **k):
    if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
        note(file)
    return real_open(file, mode, *a, **k)
def replace_(src, dst, *a, **k):
    note(dst)
    return real_replace(src, dst, *a, **k)
def mkdir_(path, *a, **k):
    note(path)
    return real_mkdir(path, *a, **k)
builtins.open, os.replace, os.mkdir = open_, replace_, mkdir_

import qlora_kit.training.step as T
real_accumulate = T.accumulate_gradients
def accumulate(step_fn, accelerator, micro_batches, step_tokens):
    step = len(seen) + 1
    if os.environ.get("QLK_TEST_FAIL") == f"{rank}:{step}":
        raise RuntimeError(f"injected failure on rank {rank} at step {step}")
    rows = []
    for b in micro_batches:
        for ids, mask in zip(b["input_ids"].tolist(), b["attention_mask"].tolist()):
            rows.append([t for t, m in zip(ids, mask) if m])
    seen.append(rows)
    return real_accumulate(step_fn, accelerator, micro_batches, step_tokens)
T.accumulate_gradients = accumulate

from qlora_kit.cli import main
try:
    code = main(sys.argv[1:])
finally:
    with real_open(record, "w") as f:
        json.dump({"steps": seen, "writes": sorted(writes)}, f)
sys.exit(code)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_data(path, n=48):
    words = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "robot", "sugar", "house", "train", "grass"]
    rows = [{"instruction": f"Spell {words[i % 12]} in capitals (item {i}).", "input": "", "output": words[i % 12].upper()}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _overrides(tmp, model_dir, out, **training):
    data = tmp / "toy.jsonl"
    if not data.exists():
        _write_data(data)
    base = [f"model.path={model_dir}", f"data.train_file={data}", "data.max_seq_len=64", "data.eval_fraction=0.0",
            f"data.cache_dir={tmp / 'cache'}", "model.compute_dtype=fp32", "model.device=cpu", "lora.r=4",
            "lora.alpha=8", f"training.output_dir={out}", "training.batch_size=4", "training.optimizer=adamw",
            "training.lr=5e-3", "training.gradient_checkpointing=off", "training.max_steps=3",
            "training.save_every=2", "training.keep_checkpoints=3"]
    return base + [f"training.{k}={v}" for k, v in training.items()]


def _launch(tmp, overrides, nproc=2, resume=False, fail=None, timeout=LAUNCH_TIMEOUT):
    """Run the wrapper under torchrun (or plainly for nproc=1); returns (process, seconds, per-rank records)."""
    script, logs = tmp / "wrapper.py", tmp / f"logs-{time.monotonic_ns()}"
    script.write_text(WRAPPER)
    logs.mkdir()
    out = next(o.split("=", 1)[1] for o in overrides if o.startswith("training.output_dir="))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QLK_TEST_OUT": str(out), "QLK_TEST_LOG": str(logs),
           "QLORA_KIT_DIST_TIMEOUT": "60", "PYTHONPATH": os.pathsep.join(sys.path)}
    if fail:
        env["QLK_TEST_FAIL"] = fail
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())] if nproc > 1 else [sys.executable]
    cmd = launcher + [str(script), "train", *overrides] + (["--resume"] if resume else [])
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    records = {int(p.stem[4:]): json.loads(p.read_text()) for p in logs.glob("rank*.json")}
    return proc, time.monotonic() - t0, records


def _adapter(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def _assert_same_adapter(a, b, atol=ATOL):
    assert sorted(a) == sorted(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"adapters differ by {worst}"
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 1e-3  # training moved B off zero


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, tiny_model_dir):
    """Two-process DDP (grad_accum 1) and the same run on one process with grad_accum 2."""
    tmp = tmp_path_factory.mktemp("ddp")
    two = _launch(tmp, _overrides(tmp, tiny_model_dir, tmp / "two"))
    one = _launch(tmp, _overrides(tmp, tiny_model_dir, tmp / "one", grad_accum=2), nproc=1)
    return tmp, two, one


def test_two_processes_equal_one_process_with_double_accumulation(ddp_runs):
    tmp, (two, seconds, _), (one, _, _) = ddp_runs
    _ok(two), _ok(one)
    assert seconds < LAUNCH_TIMEOUT
    _assert_same_adapter(_adapter(tmp / "two" / "adapter"), _adapter(tmp / "one" / "adapter"))
    losses = [[json.loads(line)["loss"] for line in (tmp / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("two", "one")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)  # global token normalisation: the same step losses
    s2, s1 = (json.loads((tmp / run / "summary.json").read_text()) for run in ("two", "one"))
    assert s2["tokens"] == s1["tokens"] and s2["supervised_tokens"] == s1["supervised_tokens"]  # counted globally
    assert two.stdout.count("completed:") == 1  # only rank 0 reports


def test_ranks_see_disjoint_data_and_together_the_whole_step(ddp_runs):
    _, (_, _, ranks), (_, _, single) = ddp_runs
    assert sorted(ranks) == [0, 1] and len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 3
    for step in range(3):
        r0 = {tuple(r) for r in ranks[0]["steps"][step]}
        r1 = {tuple(r) for r in ranks[1]["steps"][step]}
        assert r0 and r1 and not r0 & r1, f"step {step + 1}: ranks share examples"
        assert r0 | r1 == {tuple(r) for r in single[0]["steps"][step]}  # the same global batch, same order


def test_only_rank_0_writes_and_its_checkpoint_resumes_on_one_process(ddp_runs, tiny_model_dir):
    tmp, (_, _, ranks), _ = ddp_runs
    run = tmp / "two"
    assert ranks[1]["writes"] == [], f"rank 1 wrote {ranks[1]['writes']}"
    assert any(w.startswith("checkpoints") for w in ranks[0]["writes"]) and "summary.json" in ranks[0]["writes"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000003"]  # no temp leftovers
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3  # one line per step, not per rank

    resumed = tmp / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000003")
    shutil.rmtree(resumed / "adapter")
    # a different world size with the same grad_accum x world works (in-process, one rank)...
    config = load_train_config(None, _overrides(tmp, tiny_model_dir, resumed, grad_accum=2))
    result = train(config, resume=True, progress=False)
    assert result.steps == 3
    _assert_same_adapter(_adapter(resumed / "adapter"), _adapter(run / "adapter"))
    # ... and a different product is refused with the fix in the message
    shutil.rmtree(resumed / "checkpoints" / "step-000003")
    with pytest.raises(TrainingError, match="micro-batches per step"):
        train(load_train_config(None, _overrides(tmp, tiny_model_dir, resumed)), resume=True, progress=False)


def test_a_failing_rank_fails_the_launch_with_its_error(tmp_path, tiny_model_dir):
    proc, seconds, _ = _launch(tmp_path, _overrides(tmp_path, tiny_model_dir, tmp_path / "run"), fail="1:2")
    assert proc.returncode != 0
    assert "injected failure on rank 1 at step 2" in proc.stdout + proc.stderr
    assert seconds < 90, f"the launch took {seconds:.0f} s to fail"
    assert not (tmp_path / "run" / "adapter").exists()


def test_fsdp_two_processes_match_ddp(ddp_runs, tiny_model_dir):
    """FSDP1 over gloo on CPU: 4-bit weights stored as fp32 (the compute dtype), sharded over 2 ranks."""
    tmp, _, _ = ddp_runs
    fsdp, _, ranks = _launch(tmp, _overrides(tmp, tiny_model_dir, tmp / "fsdp", distributed="fsdp"))
    _ok(fsdp)
    assert "quant.quant_storage uint8 -> float32" in fsdp.stdout + fsdp.stderr
    assert ranks[1]["writes"] == []
    _assert_same_adapter(_adapter(tmp / "fsdp" / "adapter"), _adapter(tmp / "two" / "adapter"))
    state = json.loads((tmp / "fsdp" / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["sharded"] is True

    # FSDP checkpoints hold the gathered adapter (identical to DDP's at that step) but no optimizer state,
    # so resuming them is refused with a clear message instead of silently restarting Adam's moments
    _assert_same_adapter(_adapter(tmp / "fsdp" / "checkpoints" / "step-000002"),
                         _adapter(tmp / "two" / "checkpoints" / "step-000002"))
    resumed = tmp / "fsdp-resumed"
    shutil.copytree(tmp / "fsdp", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000003")
    with pytest.raises(TrainingError, match="training.distributed=fsdp"):
        train(load_train_config(None, _overrides(tmp, tiny_model_dir, resumed, grad_accum=2)), resume=True,
              progress=False)


def test_fsdp_wrap_policy_units(tiny_model_dir):
    """Single process: decoder layers and every LoRA adapter are FSDP units; nothing else is."""
    from conftest import load_tiny
    from torch.distributed.fsdp.wrap import _or_policy  # noqa: F401 (the policy is built from these)

    from qlora_kit import LoraConfig, add_lora
    from qlora_kit.training.distributed import _is_lora_unit, decoder_layer_classes, fsdp_wrap_policy

    model, _ = load_tiny(tiny_model_dir)
    add_lora(model, LoraConfig(r=4))
    assert {c.__name__ for c in decoder_layer_classes(model)} == {"LlamaDecoderLayer"}
    policy = fsdp_wrap_policy(model)
    wrapped = [n for n, m in model.named_modules() if n and policy(module=m, recurse=False, nonwrapped_numel=0)]
    layers = [n for n in wrapped if n.endswith(tuple(f"layers.{i}" for i in range(2)))]
    adapters = [n for n, m in model.named_modules() if _is_lora_unit(m)]
    assert len(layers) == 2 and sorted(wrapped) == sorted(layers + adapters) and len(adapters) == 14
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


def test_plan_divides_sharded_state_by_devices_and_replicates_under_ddp(capsys):
    from qlora_kit.cli import main
    from qlora_kit.planning.memory import plan_memory

    one = plan_memory("llama-3.1-70b", optimizer="adamw")
    fsdp = plan_memory("llama-3.1-70b", optimizer="adamw", devices=4, strategy="fsdp")
    ddp = plan_memory("llama-3.1-70b", optimizer="adamw", devices=4, strategy="ddp")
    for i in (0, 1, 2, 4):  # 4-bit weights, unquantized params, LoRA params, optimizer states
        assert fsdp.rows[i].bytes == pytest.approx(one.rows[i].bytes / 4)
        assert ddp.rows[i].bytes == pytest.approx(one.rows[i].bytes)
    assert fsdp.rows[5].bytes == one.rows[5].bytes  # activations are per device either way
    assert ddp.rows[3].bytes > one.rows[3].bytes  # DDP's persistent gradient buckets
    assert fsdp.total < one.total < ddp.total
    assert main(["plan", "--model", "llama-3.1-70b", "--devices", "2", "--strategy", "fsdp",
                 "--device-memory", "24GB"]) == 1  # 2 x 24 GB: only shorter sequences fit (the verdict says so)
    assert main(["plan", "--model", "llama-3.1-70b", "--devices", "4", "--strategy", "fsdp",
                 "--device-memory", "24GB"]) == 0
    assert "4 device(s) fsdp" in capsys.readouterr().out
