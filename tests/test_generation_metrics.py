"""Generation metrics during training (training.eval_generate_every) and the best adapter by training.best_metric:
the metric equals an independent ``evaluate()`` of the saved adapter, the held-out records are prepare_data's
split, best_adapter/ and early stopping follow best_metric, bad settings fail before any weight is loaded."""
import json

import pytest
import torch
from conftest import load_tiny
from safetensors.torch import load_file
from test_train import _config

from qlora_kit.config import ConfigError, DataConfig, TrainConfig
from qlora_kit.data import DataError
from qlora_kit.data.prepare import held_out_records, prepare_data
from qlora_kit.training.recipe import train


@pytest.fixture(scope="module")
def learnable_base(tmp_path_factory):
    """A template-less tiny Llama (a base checkpoint: the prompt contract picks alpaca) that learns the toy task."""
    from qlora_kit.testing.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("learnable-base"), initializer_range=0.3, chat_template=False)


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_exact_match_during_training_equals_an_independent_evaluate_of_the_adapter(tmp_path, learnable_base, capsys):
    from qlora_kit.data.contract import apply_contract
    from qlora_kit.inference.evaluate import evaluate
    from qlora_kit.model.adapters import load_adapter

    config = _config(tmp_path, learnable_base, max_steps=40, eval_generate_every=20, warmup_steps=2, lr=2e-2)
    result = train(config, progress=False)
    run = tmp_path / "run"
    scored = [r for r in _records(run) if "eval_exact_match" in r]
    assert [r["step"] for r in scored] == [20, 40]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_exact_match"] == result.eval_exact_match == pytest.approx(scored[-1]["eval_exact_match"], abs=1e-6)
    assert summary["best_exact_match"] == pytest.approx(max(r["eval_exact_match"] for r in scored), abs=1e-6)
    assert "exact match" in capsys.readouterr().out  # the evaluation's progress line

    # independently: the base loaded afresh, the saved adapter and its prompt contract, qlora-kit eval's code
    model, tokenizer = load_tiny(learnable_base)
    load_adapter(model, result.adapter_dir)
    apply_contract(tokenizer, result.adapter_dir)
    records = held_out_records(config.data, config.training.seed)
    assert len(records) == 12  # eval_fraction 0.25 of 48, all under the default cap of 100
    again = evaluate(model, tokenizer, records, max_new_tokens=None, loss=False)
    assert again.score == result.eval_exact_match > 0  # the task is learned a little: the test can fail
    assert json.loads((result.adapter_dir / "prompt_contract.json").read_text())["template"] == "alpaca"


def test_held_out_records_are_the_records_of_prepare_datas_eval_split(tmp_path, tiny_model_dir):
    from qlora_kit.training.validate import load_tokenizer

    config = _config(tmp_path, tiny_model_dir)
    tokenizer = load_tokenizer(tiny_model_dir)
    _, evals, _ = prepare_data(config.data, tokenizer, seed=7)
    records = held_out_records(config.data, seed=7)
    cfg = DataConfig(max_seq_len=config.data.max_seq_len)
    again, _, _ = prepare_data(cfg, tokenizer, records=records)
    assert [e.input_ids for e in again] == [e.input_ids for e in evals] and len(records) == 12
    assert held_out_records(config.data, seed=8) != records  # the seed picks them
    assert held_out_records(DataConfig(train_file=config.data.train_file)) == []  # no eval split, nothing
    with_file = DataConfig(train_file=config.data.train_file, eval_file=config.data.train_file)
    assert len(held_out_records(with_file)) == 48


def test_best_metric_exact_match_keeps_the_best_adapter_and_stops_early(tmp_path, tiny_model_dir, monkeypatch):
    """Scripted scores (the selection logic, not the metric): best at step 4, two evaluations without a better
    one stop the run at step 8 with patience 2; best_adapter/ holds the step-4 adapter."""
    scores = {2: 0.25, 4: 0.5, 6: 0.5, 8: 0.25}
    monkeypatch.setattr("qlora_kit.training.recipe.held_out_exact_match", lambda run: scores[run.progress.done])
    config = _config(tmp_path, tiny_model_dir, max_steps=12, save_every=2, keep_checkpoints=10,
                     eval_generate_every=2, best_metric="eval_exact_match", early_stopping_patience=2)
    result = train(config, progress=False)
    assert result.status == "early_stopped" and result.steps == 8
    assert result.best_step == 4 and result.best_exact_match == 0.5 and result.best_metric == "eval_exact_match"
    run = tmp_path / "run"
    best = load_file(run / "best_adapter" / "adapter_model.safetensors")
    at4, at8 = (load_file(run / "checkpoints" / f"step-{s:06d}" / "adapter_model.safetensors") for s in (4, 8))
    assert best.keys() == at4.keys() and all(torch.equal(best[k], at4[k]) for k in best)
    assert any(not torch.equal(best[k], at8[k]) for k in best)
    assert [r["eval_exact_match"] for r in _records(run) if "eval_exact_match" in r] == [0.25, 0.5, 0.5, 0.25]
    # by eval_loss (the default) the same scores pick nothing and stop nothing
    default = train(_config(tmp_path / "b", tiny_model_dir, max_steps=8, eval_generate_every=2,
                            early_stopping_patience=2), progress=False)
    assert default.status == "completed" and default.best_step == 8 and default.best_exact_match == 0.5


@pytest.mark.parametrize(("overrides", "message"), [
    ({"training.best_metric": "accuracy"}, "best_metric: 'accuracy'; use eval_loss or eval_exact_match"),
    ({"training.best_metric": "eval_exact_match"}, "needs training.eval_generate_every > 0"),
    ({"training.eval_generate_every": 5, "training.objective": "dpo"}, "does not apply to objective=dpo"),
])
def test_bad_generation_metric_settings_are_config_errors(overrides, message):
    from qlora_kit.config import from_dict

    data = {"model": {"path": "m"}, "data": {"train_file": "t.jsonl", "eval_fraction": 0.2}, "training": {}}
    for key, value in overrides.items():
        section, name = key.split(".")
        data[section][name] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_dict(TrainConfig, data).validate()


def test_records_without_a_reply_or_no_held_out_records_fail_validation_before_loading(tmp_path, tiny_model_dir):
    from qlora_kit.training.validate import validate_run

    config = _config(tmp_path, tiny_model_dir, eval_generate_every=5)
    config.data.eval_fraction = 0.0
    with pytest.raises(ConfigError, match="no held-out records to score; set data.eval_file or data.eval_fraction"):
        validate_run(config)
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"plain text number {i}"}) + "\n" for i in range(20)))
    config = _config(tmp_path, tiny_model_dir, eval_generate_every=5)
    config.data.train_file = str(data)
    with pytest.raises(DataError, match="text records have no prompt"):
        validate_run(config)


def test_loss_plot_gets_an_exact_match_axis(tmp_path, monkeypatch):
    from qlora_kit.training import metrics

    figures = []
    monkeypatch.setattr(metrics, "save_figure", lambda fig, out: figures.append(fig))
    log = metrics.MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2):
        log.write({"step": step, "loss": 2.0 / step})
    log.write({"step": 2, "eval_loss": 1.5, "eval_exact_match": 0.25})
    log.plot(tmp_path / "loss.png")
    log.records = [r for r in log.records if "eval_exact_match" not in r]
    log.plot(tmp_path / "loss.png")
    labels = [[ax.get_ylabel() for ax in fig.axes] for fig in figures]
    assert labels[0] == ["cross-entropy (nats per supervised token)", "held-out exact match (%)"]
    assert labels[1] == ["cross-entropy (nats per supervised token)"]  # not measured: no axis
    assert list(figures[0].axes[1].lines[0].get_ydata()) == [25.0]
