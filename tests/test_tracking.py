"""training.report_to: the numbers of metrics.jsonl reach TensorBoard (read back from the event files), a resumed
run continues the same folder, and a bad tracker name or a missing package is a ConfigError before any weight."""
import json

import pytest
from test_train import _config

from qlora_kit.config import TRACKERS, ConfigError, TrainingConfig
from qlora_kit.training.recipe import train
from qlora_kit.training.tracking import PROJECT, tracking_dir


def _scalars(folder):
    """{tag: {step: value}} of every scalar in the TensorBoard event files of ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _metrics(run_dir):
    """{key: {step: value}} of the numbers in metrics.jsonl."""
    out: dict = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step":
                out.setdefault(key, {})[record["step"]] = value
    return out


def _assert_same(events, metrics):
    assert set(events) == set(metrics), (sorted(events), sorted(metrics))
    for tag, by_step in metrics.items():
        assert set(events[tag]) == set(by_step), tag
        for step, value in by_step.items():
            assert events[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-9), (tag, step)


def test_tensorboard_events_equal_metrics_jsonl_and_resume_continues(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir, max_steps=3, eval_every=2, report_to="tensorboard")
    assert config.training.report_to == ["tensorboard"]  # a single name is accepted as a one-item list
    result = train(config, progress=False)
    run_dir, events_dir = result.output_dir, tracking_dir(result.output_dir) / PROJECT
    metrics = _metrics(run_dir)
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "supervised_tokens", "eval_loss"} <= set(metrics)
    _assert_same(_scalars(events_dir), metrics)

    longer = _config(tmp_path, tiny_model_dir, max_steps=5, eval_every=2, report_to=["tensorboard"])
    again = train(longer, resume=True, progress=False)
    assert again.steps == 5 and list(tracking_dir(run_dir).iterdir()) == [events_dir]  # the same folder
    metrics = _metrics(run_dir)
    assert set(metrics["loss"]) == {1, 2, 3, 4, 5}
    _assert_same(_scalars(events_dir), metrics)


@pytest.mark.parametrize("value, expected", [("none", []), ([], []), ("tensorboard, tensorboard", ["tensorboard"]),
                                             (["none"], [])])
def test_report_to_spellings(value, expected):
    config = TrainingConfig(report_to=value)
    config.validate()
    assert config.report_to == expected


def test_unknown_tracker_and_missing_package_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match=r"training\.report_to: unknown tracker 'tensorbord'; use tensorboard"):
        TrainingConfig(report_to=["tensorbord"]).validate()
    monkeypatch.setitem(TRACKERS, "wandb", "qlora_kit_no_such_package")
    with pytest.raises(ConfigError, match=r"training\.report_to: wandb is not installed; pip install "
                                          r"qlora_kit_no_such_package"):
        TrainingConfig(report_to="wandb").validate()


def test_cli_validate_reports_a_missing_tracker_before_loading(tmp_path, tiny_model_dir, capsys):
    from qlora_kit.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "hi", "output": "ho"}) + "\n")
    code = main(["validate", f"model.path={tiny_model_dir}", f"data.train_file={data}",
                 "training.report_to=[tensorboard, comet]"])
    assert code == 2
    assert "training.report_to: unknown tracker 'comet'" in capsys.readouterr().err


def test_wandb_defaults_offline_in_the_run_folder_and_keeps_its_run_id(tmp_path, monkeypatch):
    """W&B (not installed here, so its arguments are checked, not a run): offline unless WANDB_MODE is set,
    writing under <output_dir>/tracking, and the same run id for a resumed run of the folder."""
    from qlora_kit.training.tracking import tracker_kwargs

    monkeypatch.delenv("WANDB_MODE", raising=False)
    folder, ids = tmp_path / "run" / "tracking", {}
    first = tracker_kwargs(["wandb", "tensorboard"], folder, ids, 0)
    assert first["wandb"]["mode"] == "offline" and first["wandb"]["dir"] == str(folder)
    assert "tensorboard" not in first  # a new run purges nothing
    again = tracker_kwargs(["wandb", "tensorboard"], folder, ids, 6)
    assert again["wandb"]["id"] == first["wandb"]["id"] and again["wandb"]["resume"] == "allow"
    assert again["tensorboard"] == {"purge_step": 7}
    monkeypatch.setenv("WANDB_MODE", "online")
    assert "mode" not in tracker_kwargs(["wandb"], folder, {}, 0)["wandb"]
