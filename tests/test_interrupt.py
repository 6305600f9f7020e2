"""Interruptions of a real ``python -m qlora_kit train`` process: SIGTERM/SIGINT and kill -9 at random points.

Every run here is a subprocess on the tiny model (16 steps, a checkpoint every step). The uninterrupted
reference runs in the background while the interrupted chains run, so the module costs about nine
process start-ups in wall time.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_kit.training.checkpoint import STATE_FILE, latest_checkpoint, list_checkpoints

STEPS = 48  # steps take 0.02-0.1 s (idle vs loaded); process start-up (~5 s) dominates
TIMEOUT = 120  # seconds any one process may take before the test gives up


def _write_run(folder: Path, model_dir: Path) -> Path:
    """A toy data file and a YAML config (absolute paths) in ``folder``; returns the config path."""
    folder.mkdir(parents=True, exist_ok=True)
    words = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "robot"]
    rows = [{"instruction": f"Spell {w} in capitals.", "output": w.upper()} for w in words * 4]
    (folder / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": {"path": str(model_dir), "compute_dtype": "fp32", "device": "cpu"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"train_file": str(folder / "toy.jsonl"), "max_seq_len": 64},
        "training": {"output_dir": str(folder / "run"), "batch_size": 4, "optimizer": "adamw", "lr": 5e-3,
                     "gradient_checkpointing": "off", "max_steps": STEPS, "save_every": 1, "keep_checkpoints": 2},
    }
    import yaml

    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _launch(cmd: list[str], folder: Path, tag: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    err = open(folder / f"{tag}.stderr", "wb")
    out = open(folder / f"{tag}.stdout", "wb")
    return subprocess.Popen(cmd, cwd=folder, env=env, stdout=out, stderr=err)


def _train_cmd(config: Path, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "qlora_kit", "train", str(config)] + (["--resume"] if resume else [])


def _logged_step(run: Path) -> int:
    """The highest optimizer step in metrics.jsonl (torn lines ignored)."""
    best = 0
    path = run / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                best = max(best, int(json.loads(line).get("step", 0)))
            except (ValueError, AttributeError):
                pass
    return best


def _metrics_inode(run: Path) -> int | None:
    path = run / "metrics.jsonl"
    return path.stat().st_ino if path.is_file() else None


def _wait_for_step(proc: subprocess.Popen, run: Path, k: int, folder: Path, tag: str) -> None:
    """Wait until ``proc`` itself has logged step ``k``.

    A resumed process first rewrites metrics.jsonl (atomically: a new inode) without the lines past its
    checkpoint, so lines a killed predecessor left behind are not mistaken for progress.
    """
    stale = _metrics_inode(run)
    deadline = time.monotonic() + TIMEOUT
    while _metrics_inode(run) in (None, stale) or _logged_step(run) < k:
        if proc.poll() is not None:
            pytest.fail(f"{tag} exited ({proc.returncode}) before step {k}: {(folder / f'{tag}.stderr').read_text()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{tag} did not reach step {k} in {TIMEOUT} s")
        time.sleep(0.01)


def _finish(proc: subprocess.Popen, folder: Path, tag: str) -> tuple[int, str, str]:
    proc.wait(timeout=TIMEOUT)
    return proc.returncode, (folder / f"{tag}.stdout").read_text(), (folder / f"{tag}.stderr").read_text()


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """The uninterrupted run, started in the background; call the fixture's value to get its adapter bytes."""
    folder = tmp_path_factory.mktemp("reference")
    proc = _launch(_train_cmd(_write_run(folder, tiny_model_dir)), folder, "reference")

    def adapter_bytes() -> bytes:
        rc, _, err = _finish(proc, folder, "reference")
        assert rc == 0, err[-2000:]
        return (folder / "run" / "adapter" / "adapter_model.safetensors").read_bytes()

    yield adapter_bytes
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _assert_checkpoints_whole(run: Path) -> None:
    """Every ``step-*`` folder is complete; leftovers of killed writes are dot-folders only."""
    root = run / "checkpoints"
    for p in root.iterdir():
        if p.name.startswith("step-"):
            assert (p / STATE_FILE).is_file() and (p / "optimizer.safetensors").is_file(), p
        else:
            assert p.name.startswith("."), p


def test_sigterm_then_sigint_checkpoint_exit_0_and_print_a_working_resume_command(tiny_model_dir, tmp_path, reference):
    config = _write_run(tmp_path, tiny_model_dir)
    run = tmp_path / "run"

    first = _launch(_train_cmd(config), tmp_path, "first")
    _wait_for_step(first, run, 2, tmp_path, "first")
    first.send_signal(signal.SIGTERM)
    rc, out, err = _finish(first, tmp_path, "first")
    assert rc == 0, err[-2000:]
    assert "SIGTERM received" in err
    stopped = _logged_step(run)
    assert 2 <= stopped < STEPS
    ckpt = latest_checkpoint(run / "checkpoints")
    assert ckpt is not None and json.loads((ckpt / STATE_FILE).read_text())["step"] == stopped
    assert not (run / "adapter").exists()  # interrupted: only the checkpoint, no final adapter
    lines = out.splitlines()
    command = lines[lines.index(next(x for x in lines if "Resume with" in x)) + 1].split()
    assert command[:2] == ["qlora-kit", "train"] and "--resume" in command and str(config) in command

    # the printed command, run as printed (the console script replaced by the module), resumes
    second = _launch([sys.executable, "-m", "qlora_kit"] + command[1:], tmp_path, "second")
    _wait_for_step(second, run, stopped + 1, tmp_path, "second")
    second.send_signal(signal.SIGINT)
    rc, out, err = _finish(second, tmp_path, "second")
    assert rc == 0, err[-2000:]
    assert "SIGINT received" in err and f"resumed from {ckpt}" in err and "--resume" in out
    ckpt2 = latest_checkpoint(run / "checkpoints")
    assert json.loads((ckpt2 / STATE_FILE).read_text())["step"] == _logged_step(run) > stopped
    _assert_checkpoints_whole(run)


def test_kill_9_at_five_random_points_then_resume_is_bit_identical(tiny_model_dir, tmp_path, reference):
    seed = int(os.environ.get("QLORA_KIT_KILL_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    # kill once step k is logged, plus a random delay; early points leave room for each kill overshooting
    # by a few steps on a fast machine (20 ms steps) before the next launch resumes
    points = sorted(rng.sample(range(1, STEPS // 4), 5))
    config = _write_run(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    for i, k in enumerate(points):
        tag = f"kill{i}"
        saved = latest_checkpoint(run / "checkpoints")
        proc = _launch(_train_cmd(config, resume=i > 0), tmp_path, tag)
        _wait_for_step(proc, run, max(k, int(saved.name[5:]) + 1 if saved else 1), tmp_path, tag)  # >= 1 new step
        time.sleep(rng.uniform(0.0, 0.06))  # somewhere in the next steps: forward, backward, checkpoint write
        assert proc.poll() is None, f"seed {seed}: {tag} finished before its kill point {k}"
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        _assert_checkpoints_whole(run)
        assert all(int(p.name[5:]) <= _logged_step(run) for p in list_checkpoints(run / "checkpoints"))

    rc, _, err = _finish(_launch(_train_cmd(config, resume=True), tmp_path, "final"), tmp_path, "final")
    assert rc == 0, err[-2000:]
    resumed = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert resumed == reference(), f"kill points {points} (QLORA_KIT_KILL_SEED={seed}) changed the result"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # the log of the killed runs was trimmed back on each resume


def test_interrupting_a_resumed_run_before_its_first_evaluation_writes_a_whole_run_summary(tiny_model_dir, tmp_path,
                                                                                          monkeypatch):
    # in-process: SIGINT to ourselves right after a step is logged (as tests/test_train.py does)
    from test_train import _config, _interrupt_at

    from qlora_kit.training.recipe import train

    steps = {"max_steps": 8, "save_every": 1, "eval_every": 4}
    with monkeypatch.context() as m:
        _interrupt_at(m, 5)  # after the evaluation at step 4: the checkpoint holds a best validation loss
        first = train(_config(tmp_path, tiny_model_dir, **steps), progress=False)
    with monkeypatch.context() as m:
        _interrupt_at(m, 6)  # the resumed session stops before its own first evaluation (step 8)
        second = train(_config(tmp_path, tiny_model_dir, **steps), resume=True, progress=False)
    assert first.status == second.status == "interrupted" and second.steps == 6
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_loss"] is None and summary["best_step"] == 4
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    per_step = [r["supervised_tokens"] for r in logged if "loss" in r]
    assert len(per_step) == 6 and summary["supervised_tokens"] == sum(per_step) > sum(per_step[5:])
    assert summary["tokens"] > second.tokens - first.tokens > 0 and summary["seconds"] > 0


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tiny_model_dir, tmp_path):
    config = _write_run(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    proc = _launch(_train_cmd(config), tmp_path, "twice")
    _wait_for_step(proc, run, 2, tmp_path, "twice")
    proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + TIMEOUT
    while "SIGINT received" not in (tmp_path / "twice.stderr").read_text():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    rc, _, err = _finish(proc, tmp_path, "twice")
    assert rc == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # (tqdm closes its bar at exit, after it)
    assert len(errors) == 1 and errors[0].startswith("error: interrupted again: stopped at once")
    _assert_checkpoints_whole(run)
