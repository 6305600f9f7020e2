"""Health checks on synthetic loss/gradient sequences, and a run that dies is stopped, never "completed"."""
import json
import math

import torch

from qlora_kit.cli import main
from qlora_kit.training.health import HealthLimits, HealthMonitor, largest_weight


def _feed(monitor, losses, norms=None):
    """Feed steps 1..n; return the first problem (or None)."""
    for i, loss in enumerate(losses):
        problem = monitor.check_step(i + 1, loss, 1.0 if norms is None else norms[i])
        if problem is not None:
            return problem
    return None


def test_the_issue_sequence_is_caught_as_uniform_guessing_at_step_2():
    # the demo model at lr=1e3: 2.59 -> 27.45 -> 10.80 = ln(49152)
    problem = _feed(HealthMonitor(49152), [2.59, 27.45, 10.80])
    assert problem.kind in ("uniform", "spike") and problem.step == 2
    assert "step 2: loss 27.45" in problem.message and "ln(vocab)=10.8" in problem.message
    assert problem.last_good_step == 0  # the loss at step 2 indicts the weights of step 1


def test_a_random_model_starting_near_uniform_is_not_flagged():
    uniform = math.log(384)
    losses = [uniform - 0.02, uniform - 0.07, uniform + 0.01, uniform + 0.2, uniform - 0.1, uniform + 0.3] + \
             [uniform - 0.1 * k for k in range(20)]  # starts at (even above) ln V, then learns
    assert _feed(HealthMonitor(384), losses) is None


def test_uniform_needs_the_loss_to_have_been_clearly_below():
    uniform = math.log(384)
    assert _feed(HealthMonitor(384), [0.8 * uniform, uniform]) is None  # 0.8 ln V is not clearly below (margin 0.25)
    problem = _feed(HealthMonitor(384), [0.7 * uniform, 0.6 * uniform, uniform + 0.01])
    assert problem.kind == "uniform" and problem.step == 3


def test_spikes_are_relative_to_the_recent_median_with_an_absolute_floor():
    steady = [2.0, 2.1, 1.9, 2.05, 1.95, 2.0]
    problem = _feed(HealthMonitor(49152), steady + [9.0])  # a large vocabulary: 9.0 is still below ln(V)
    assert problem.kind == "spike" and problem.step == 7 and "4.5x the median 2" in problem.message
    assert problem.last_good_step == 5
    assert _feed(HealthMonitor(49152), steady + [7.9]) is None  # under 4x
    assert _feed(HealthMonitor(384), [0.05] * 10 + [1.5]) is None  # 30x, but only 1.45 nats: a hard batch, not a spike
    assert _feed(HealthMonitor(384), [0.05] * 10 + [2.2]) is not None
    assert _feed(HealthMonitor(384), [9.0, 9.0, 20.0]) is None  # too little history to judge
    falling = [6.0 * 0.8 ** k for k in range(40)]
    assert _feed(HealthMonitor(1000), falling) is None


def test_zero_gradient_norm_three_steps_in_a_row_is_dead_training():
    monitor = HealthMonitor(384)
    problem = _feed(monitor, [5.9] * 6, norms=[0.6, 6.2, 0.0, 0.0, 0.0, 0.0])
    assert problem.kind == "dead" and problem.step == 5 and "since step 3" in problem.message
    assert problem.last_good_step == 1  # step 3's zero gradient indicts the weights left by step 2
    assert _feed(HealthMonitor(384), [5.9] * 8, norms=[0.5, 0.0, 0.0, 0.4, 0.0, 0.0, 0.3, 0.0]) is None


def test_non_finite_loss_or_gradient():
    for loss, norm in ((float("nan"), 1.0), (2.0, float("inf")), (float("-inf"), 1.0)):
        problem = HealthMonitor(384).check_step(4, loss, norm)
        assert problem.kind == "nonfinite" and problem.skippable and problem.last_good_step == 3


def test_weights_non_finite_or_exploding():
    params = [torch.zeros(4, 3), torch.ones(2, 5) * -7.0]
    assert largest_weight(params) == 7.0
    monitor = HealthMonitor(384)
    assert monitor.check_weights(3, largest_weight(params)) is None
    params[0][1, 2] = float("nan")
    assert monitor.check_weights(3, largest_weight(params)).kind == "weights"
    params[0][1, 2] = 1e30  # the finite bit flip
    problem = monitor.check_weights(3, largest_weight(params))
    assert problem.kind == "weights" and not problem.skippable and problem.last_good_step == 2
    params[0][1, 2] = float("-inf")
    assert math.isinf(largest_weight(params))


def test_the_history_survives_a_json_round_trip_and_a_rollback_forgets_later_steps():
    monitor = HealthMonitor(49152, HealthLimits(spike_min_history=3))
    assert _feed(monitor, [2.0, 2.0, 2.0, 2.0]) is None
    restored = HealthMonitor(49152, HealthLimits(spike_min_history=3))
    restored.load(json.loads(json.dumps(monitor.state())))
    assert restored.check_step(5, 9.0, 1.0).kind == "spike"  # the baseline came back
    restored.forget_after(2)
    assert [s for s, _ in restored.recent] == [1, 2]
    assert restored.check_step(3, 9.0, 1.0) is None  # only two losses of history now


def _cli_args(folder, model_dir, *training):
    folder.mkdir(parents=True, exist_ok=True)
    words = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "robot"]
    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Spell {w}.", "output": w.upper()}) + "\n" for w in words * 2))
    return ["train", f"model.path={model_dir}", f"data.train_file={data}", "data.max_seq_len=64",
            "model.compute_dtype=fp32", "model.device=cpu", "lora.r=4", "lora.alpha=8", "training.batch_size=4",
            "training.optimizer=adamw", "training.gradient_checkpointing=off", f"training.output_dir={folder / 'run'}",
            *training]


def test_lr_1e3_dies_and_is_stopped_with_exit_4_never_completed(tiny_model_dir, tmp_path, capsys):
    # the issue's repro on the tiny model: the loss goes to ln(384) = 5.95 and the gradient to exactly 0.0
    rc = main(_cli_args(tmp_path, tiny_model_dir, "training.lr=1e3", "training.max_steps=12", "training.save_every=1"))
    err = capsys.readouterr().err.strip()
    assert rc == 4, err
    line = err.splitlines()[-1]  # earlier lines are the loader's progress bars
    assert err.count("error:") == 1 and "Traceback" not in err
    assert line.startswith("error: step 5: gradient norm exactly 0 since step 3") and "training is dead; stopped" in line
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["steps"] == 4 and "since step 3" in summary["stopped_because"]
    assert summary["adapter_dir"] is None and not (tmp_path / "run" / "adapter").exists()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["grad_norm"] for r in logged][2:] == [0.0, 0.0]  # the monitor saw what really happened


def test_normal_runs_are_not_flagged(tiny_model_dir, tmp_path):
    rc = main(_cli_args(tmp_path, tiny_model_dir, "training.lr=5e-3", "training.max_steps=16"))
    assert rc == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"

