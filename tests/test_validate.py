"""Validate before spending: every bad input is caught before a weight is loaded, and explains itself."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml

from qlora_kit.cli import main
from qlora_kit.config import ConfigError, load_train_config
from qlora_kit.data import DataError
from qlora_kit.data.tokenize import tokenize_example
from qlora_kit.training.validate import validate_run

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon"]


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    """Any attempt to load model weights during validation fails the test."""
    import transformers

    import qlora_kit.model.load
    import qlora_kit.training.setup

    def refuse(*a, **k):
        raise AssertionError("model weights were loaded during validation")

    monkeypatch.setattr(qlora_kit.model.load, "load_model", refuse)
    monkeypatch.setattr(qlora_kit.training.setup, "load_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def _records(n=12):
    return [{"instruction": f"Spell {w} in capitals.", "output": w.upper()} for w in (WORDS * n)[:n]]


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _yaml(tmp_path, model_dir, train_file=None, **sections):
    """A config file for the tiny model; ``sections`` update the default sections."""
    train_file = train_file if train_file is not None else _jsonl(tmp_path / "train.jsonl", _records())
    config = {"model": {"path": str(model_dir), "compute_dtype": "fp32", "device": "cpu"},
              "lora": {"r": 4, "alpha": 8},
              "data": {"train_file": str(train_file), "max_seq_len": 64},
              "training": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "optimizer": "adamw"}}
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _validate(path, *overrides):
    return validate_run(load_train_config(path, list(overrides)))


# ---------------------------------------------------------------------------------------------
# Data errors: file, line, field, fix


def test_malformed_json_line_names_file_and_line(tmp_path, tiny_model_dir):
    data = _jsonl(tmp_path / "train.jsonl", [_records()[0], '{"instruction": "x", "output": ', _records()[1]])
    with pytest.raises(DataError, match=r"train\.jsonl line 2: malformed JSON .*one complete JSON object"):
        _validate(_yaml(tmp_path, tiny_model_dir, data))


def test_missing_field_names_line_field_and_format(tmp_path, tiny_model_dir):
    data = _jsonl(tmp_path / "train.jsonl", _records(3) + [{"instruction": "no answer"}])
    with pytest.raises(DataError, match=r'train\.jsonl line 4: missing field "output" \(alpaca format needs '
                                        r"instruction, output\)"):
        _validate(_yaml(tmp_path, tiny_model_dir, data))


def test_wrongly_typed_field_names_line_and_field(tmp_path, tiny_model_dir):
    data = _jsonl(tmp_path / "train.jsonl", _records(2) + [{"instruction": "count", "output": 3}])
    with pytest.raises(DataError, match=r'train\.jsonl line 3: field "output" must be a string, got int.*quote'):
        _validate(_yaml(tmp_path, tiny_model_dir, data))


def test_wrongly_typed_chat_message(tmp_path, tiny_model_dir):
    data = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": ["a", "b"]}]}])
    with pytest.raises(DataError, match=r'chat\.jsonl line 1: field "messages\[1\]\.content" must be a string'):
        _validate(_yaml(tmp_path, tiny_model_dir, data))


def test_empty_dataset(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text("\n\n")
    with pytest.raises(DataError, match=r"train\.jsonl: no records .*add training records"):
        _validate(_yaml(tmp_path, tiny_model_dir, data))


def test_missing_data_file(tmp_path, tiny_model_dir):
    with pytest.raises(DataError, match=r"nope\.jsonl: data file not found .*data\.train_file"):
        _validate(_yaml(tmp_path, tiny_model_dir, tmp_path / "nope.jsonl"))


def test_all_examples_too_long(tmp_path, tiny_model_dir):
    long = [{"instruction": "Spell " + " ".join(WORDS * 4), "output": "x"}] * 3
    data = _jsonl(tmp_path / "train.jsonl", long)
    with pytest.raises(DataError, match=r"all 3 examples were dropped: 3 were longer than data\.max_seq_len=16 "
                                        r".*raise data\.max_seq_len"):
        _validate(_yaml(tmp_path, tiny_model_dir, data, data={"max_seq_len": 16}))


def test_undecodable_bytes_name_the_line(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_bytes(json.dumps(_records()[0]).encode() + b"\n" + b'{"instruction": "\xff\xfe", "output": "x"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl line 2: not UTF-8 text"):
        _validate(_yaml(tmp_path, tiny_model_dir, data))


# ---------------------------------------------------------------------------------------------
# Config errors: file, line, key, closest valid key


def test_unknown_key_names_file_line_and_closest_key(tmp_path, tiny_model_dir):
    path = _yaml(tmp_path, tiny_model_dir, lora={"dropuot": 0.1})
    with pytest.raises(ConfigError, match=r"config\.yaml line 8: unknown config key 'lora\.dropuot'; "
                                          r"did you mean 'dropout'\?"):
        _validate(path)
    with pytest.raises(ConfigError, match=r"unknown config key 'training\.learning_rat'.*"):
        _validate(_yaml(tmp_path, tiny_model_dir), "training.learning_rat=1e-4")
    with pytest.raises(ConfigError, match=r"unknown config key 'trainig'; did you mean 'training'\?"):
        _validate(_yaml(tmp_path, tiny_model_dir), "trainig.lr=1e-4")


@pytest.mark.parametrize("section,key,value,message", [
    ("lora", "r", -8, r"line 6: lora\.r: must be in \[1, 65_536\], got -8"),
    ("lora", "dropout", 1.0, r"line 8: lora\.dropout: must be in \[0, 1\), got 1\.0"),
    ("lora", "alpha", "big", r"line 7: lora\.alpha: expected a number, got 'big'"),
    ("training", "optimizer", "sgd", r"line 14: training\.optimizer: 'sgd' is unknown; use paged_adamw_8bit"),
    ("training", "lr", float("nan"), r"line 15: training\.lr: must be in \(0, inf\), got nan"),
    ("data", "max_seq_len", 4, r"data\.max_seq_len: must be in \[8, 16_777_216\], got 4"),
])
def test_invalid_values_name_line_key_and_fix(tmp_path, tiny_model_dir, section, key, value, message):
    path = _yaml(tmp_path, tiny_model_dir, **{section: {key: value}})
    with pytest.raises(ConfigError, match=message):
        _validate(path)


def test_target_module_that_matches_nothing_is_found_without_weights(tmp_path, tiny_model_dir):
    path = _yaml(tmp_path, tiny_model_dir, lora={"r": 4, "target_modules": ["qkv_proj"]})
    with pytest.raises(ConfigError, match=r"lora\.target_modules=\['qkv_proj'\].*matches no linear layer.*"
                                          r"named: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        _validate(path)
    report = _validate(path, "lora.target_modules=[q_proj, v_proj]", "lora.layers=[1]")
    assert report.targets == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_model_path_errors(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"model\.path '.*nowhere': no such folder"):
        _validate(_yaml(tmp_path, tiny_model_dir), f"model.path={tmp_path / 'nowhere'}")
    encoder = tmp_path / "vit"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    (encoder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"model_type 'vit' \(ViTModel\) is not a causal language model"):
        _validate(_yaml(tmp_path, tiny_model_dir), f"model.path={encoder}")
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ConfigError, match=r"no \*\.safetensors weights \(qlora-kit never loads pickled"):
        _validate(_yaml(tmp_path, tiny_model_dir), f"model.path={pickled}")


# ---------------------------------------------------------------------------------------------
# The summary, the CLI, and train() using the same path first


def test_summary_counts_lengths_truncation_and_supervision(tmp_path, tiny_model_dir):
    rows = _records(10) + [{"instruction": "Spell them.", "output": " ".join(WORDS * 3)}] * 2
    report = _validate(_yaml(tmp_path, tiny_model_dir, _jsonl(tmp_path / "t.jsonl", rows), data={"max_seq_len": 40}))
    # independent reference: tokenize each record on its own and truncate by hand
    cfg = report.config.data
    full = [tokenize_example(r, "alpaca", report.tokenizer, cfg, "r") for r in rows]
    kept = [(e.input_ids[:40], e.labels[:40]) for e in full]
    kept = [(i, y) for i, y in kept if any(t != -100 for t in y[1:])]
    lengths = sorted(len(i) for i, _ in kept)
    s = report.stats
    assert s.records == 12 and s.examples == len(kept) and s.examples == len(report.train_set)
    assert s.truncated == sum(len(e.input_ids) > 40 for e in full) == 2
    assert report.truncated_fraction == pytest.approx(2 / 12)
    assert s.len_max == lengths[-1] == 40
    assert (s.len_p50, s.len_p90, s.len_p99) == tuple(int(np.percentile(lengths, q)) for q in (50, 90, 99))
    supervised = sum(sum(t != -100 for t in y[1:]) for _, y in kept)
    assert report.supervised_fraction == pytest.approx(supervised / sum(lengths))
    text = report.summary()
    for part in (f"{s.records} records", "p50/p90/p99/max", "truncated: 16.7%", "supervised:", "14 layers"):
        assert part in text, text


def test_cli_validate_prints_summary_and_exits_0(tmp_path, tiny_model_dir, capsys):
    path = _yaml(tmp_path, tiny_model_dir)
    assert main(["validate", str(path), "data.max_seq_len=48"]) == 0
    out = capsys.readouterr().out
    assert "12 records -> 12 train / 0 eval examples" in out and "data.max_seq_len=48" in out
    assert "supervised:" in out and "ok:" in out
    assert not (tmp_path / "run").exists()  # validate writes no run folder


def test_cli_validate_bad_input_is_one_line_and_exit_2(tmp_path, tiny_model_dir, capsys):
    data = _jsonl(tmp_path / "train.jsonl", _records(3) + [{"instruction": "x"}])
    assert main(["validate", str(_yaml(tmp_path, tiny_model_dir, data))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "line 4" in err and '"output"' in err and "\n" not in err


def test_train_validates_everything_before_loading_the_model(tmp_path, tiny_model_dir):
    from qlora_kit.training.recipe import train

    data = _jsonl(tmp_path / "train.jsonl", _records(50) + ["not json"])
    with pytest.raises(DataError, match="line 51: malformed JSON"):  # the autouse fixture refuses any load
        train(load_train_config(_yaml(tmp_path, tiny_model_dir, data)), progress=False)
    with pytest.raises(ConfigError, match="matches no linear layer"):
        train(load_train_config(_yaml(tmp_path, tiny_model_dir), ["lora.target_modules=[nothing]"]), progress=False)
    assert not (tmp_path / "run").exists()


def _refusal(tmp_path, model_dir, monkeypatch, available, *overrides, force=False):
    """validate_run with ``available`` bytes of free memory: the memory refusal's message, or None if accepted."""
    import qlora_kit.hardware

    monkeypatch.setattr(qlora_kit.hardware, "available_memory", lambda device: available)
    try:
        validate_run(load_train_config(_yaml(tmp_path, model_dir), list(overrides)), force=force)
    except ConfigError as e:
        return str(e)
    return None


def test_a_run_far_beyond_the_available_memory_is_refused_with_the_plan_unless_forced(tmp_path, tiny_model_dir,
                                                                                         monkeypatch):
    import re

    message = _refusal(tmp_path, tiny_model_dir, monkeypatch, 2**20)  # 1 MiB free (the autouse fixture forbids loads)
    assert message is not None and message.startswith("memory: this run needs about ") and "\n" not in message
    need = float(re.search(r"needs about ([\d.]+) GiB", message).group(1)) * 2**30
    assert "0.0 GiB is available on cpu (refused above 1.5x)" in message
    assert "biggest: " in message and "framework overhead" in message and "--force" in message
    assert _refusal(tmp_path, tiny_model_dir, monkeypatch, 2**20, force=True) is None
    assert _refusal(tmp_path, tiny_model_dir, monkeypatch, need / 1.4) is None  # within the margin: not refused
    assert _refusal(tmp_path, tiny_model_dir, monkeypatch, need / 1.6) is not None


def test_an_absurd_rank_is_refused_before_loading_and_tiny_runs_are_not(tmp_path, tiny_model_dir, capsys,
                                                                       monkeypatch):
    """lora.r = 10,000,000 is outside lora.r's range; r = 65,536 (the largest allowed) on the tiny model plans to
    several GiB: with 1 GiB free it is refused by validate and train (the autouse fixture fails any weight load);
    the same config at r=4 validates on this machine."""
    import qlora_kit.hardware
    from qlora_kit.training.recipe import train

    config = _yaml(tmp_path, tiny_model_dir)
    assert main(["validate", str(config), "lora.r=10000000"]) == 2
    assert "lora.r" in capsys.readouterr().err
    monkeypatch.setattr(qlora_kit.hardware, "available_memory", lambda device: 2**30)
    with pytest.raises(ConfigError, match=r"^memory: this run needs about \d+\.\d GiB .*lora\.r"):
        train(load_train_config(config, ["lora.r=65536"]), progress=False)
    assert main(["validate", str(config), "lora.r=65536"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: memory: this run needs about") and err.count("\n") == 1
    monkeypatch.undo()
    assert main(["validate", str(config)]) == 0
    assert not (tmp_path / "run").exists()


def test_force_flag_reaches_train_and_validate(tmp_path, tiny_model_dir, monkeypatch):
    import qlora_kit.hardware
    import qlora_kit.training.recipe

    seen = {}
    monkeypatch.setattr(qlora_kit.training.recipe, "train", lambda config, **kw: seen.update(kw) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["train", str(_yaml(tmp_path, tiny_model_dir)), "--force"])
    assert seen["force"] is True
    monkeypatch.setattr(qlora_kit.hardware, "available_memory", lambda device: 2**20)
    assert main(["validate", str(_yaml(tmp_path, tiny_model_dir))]) == 2
    assert main(["validate", str(_yaml(tmp_path, tiny_model_dir)), "--force"]) == 0


@pytest.mark.parametrize("chat_template", [True, False])
def test_cli_validate_says_each_thing_once(tmp_path, chat_template):
    """The data summary, the prompt and the compute-dtype choice appear once in what `qlora-kit validate` shows
    (issue 18: the data summary was logged by data preparation and printed again; the prompt line likewise)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from qlora_kit.testing.tiny import make_tiny_model

    repo = Path(__file__).resolve().parents[1]
    model = make_tiny_model(tmp_path / "model", chat_template=chat_template)
    cmd = [sys.executable, "-m", "qlora_kit", "validate", str(repo / "docs" / "config.example.yaml"),
           f"model.path={model}", f"training.output_dir={tmp_path / 'run'}",
           f"data.train_file={repo / 'docs/examples/train.jsonl'}", f"data.eval_file={repo / 'docs/examples/eval.jsonl'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tmp_path, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(repo)}, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    for start in ("data:", "prompt:", "compute dtype auto", "token length", "model:"):
        assert sum(line.startswith(start) for line in lines) == 1, (start, lines)
