"""Property-based fuzzing of everything a user hands us: config dicts, YAML files, key=value overrides, data
records and data files. The only outcomes allowed are success or a ConfigError/DataError (whose message
names the place); any other exception is a bug. About 900 generated cases in all."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_kit.config import (
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    QuantConfig,
    TrainConfig,
    TrainingConfig,
    from_dict,
    load_train_config,
    to_dict,
)
from qlora_kit.data import DataError
from qlora_kit.data.formats import FORMATS
from qlora_kit.data.preference import PreferenceExample
from qlora_kit.data.prepare import prepare_data
from qlora_kit.testing.tiny import build_tokenizer

FUZZ = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.filter_too_much, HealthCheck.data_too_large])

SECTIONS = {"model": ModelConfig, "quant": QuantConfig, "lora": LoraConfig, "data": DataConfig,
            "training": TrainingConfig}
FIELD_NAMES = sorted({f for cls in SECTIONS.values() for f in cls.__dataclass_fields__})

texts = st.text(max_size=12)
# any character, lone UTF-16 surrogates included (JSON's \ud800 escapes produce them)
wild_texts = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=12)
scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10**400), max_value=10**400)
           | st.floats() | texts | st.sampled_from(["nf4", "adamw", "all-linear", "cosine", "1e-4", "on", "8"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                      max_leaves=6)
keys = st.sampled_from(FIELD_NAMES) | texts | st.integers()
sections = st.dictionaries(keys, values, max_size=6)
config_dicts = st.dictionaries(st.sampled_from(sorted(SECTIONS)) | texts, sections | values, max_size=5)


@settings(FUZZ, max_examples=250)
@given(config_dicts)
def test_config_dicts_give_a_config_or_a_config_error(data):
    try:
        config = from_dict(TrainConfig, data)
    except ConfigError as e:
        assert str(e)
        return
    assert from_dict(TrainConfig, to_dict(config)) == config  # what was accepted round-trips


@settings(FUZZ, max_examples=150)
@given(st.lists(st.tuples(st.lists(st.sampled_from(sorted(SECTIONS) + FIELD_NAMES) | texts, min_size=1, max_size=3),
                          st.text(max_size=15) | st.sampled_from(["[", "{a: 1", "[1, [2]]", "!!binary aGk=", "2024-01-01",
                                                                  "? [a]: 1", "*x", "~", ".nan", "1e999"])),
                max_size=4))
def test_key_value_overrides_give_a_config_or_a_config_error(pairs):
    overrides = [".".join(path) + "=" + value for path, value in pairs]
    try:
        load_train_config(None, overrides)
    except ConfigError as e:
        assert str(e)


@settings(FUZZ, max_examples=100)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
       | config_dicts.map(lambda d: json.dumps(d, default=str).encode()))
def test_yaml_files_give_a_config_or_a_config_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("yaml") / "config.yaml"
    path.write_bytes(raw)
    try:
        load_train_config(path, ["model.path=m", "data.train_file=d.jsonl"])
    except ConfigError as e:
        assert str(path) in str(e)


# ---------------------------------------------------------------------------------------------
# Data


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


record_fields = st.sampled_from(sorted({f.name for fmt in FORMATS.values() for f in fmt.fields})) | texts
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]) | values,
                                           "content": wild_texts | values}) | values, max_size=4)
field_values = wild_texts | values | messages
records = st.dictionaries(record_fields, field_values, max_size=4) | values
data_configs = st.builds(DataConfig, format=st.sampled_from(["auto", "alpaca", "chat", "prompt_completion", "text",
                                                            "preference"]),
                         max_seq_len=st.integers(8, 48), train_on_prompt=st.booleans(),
                         system_prompt=st.sampled_from(["", "Be brief."]))


def _prepare(cfg, tokenizer, **kwargs):
    try:
        train, evals, stats = prepare_data(cfg, tokenizer, **kwargs)
    except DataError as e:
        assert str(e)
        return
    assert train and stats.examples == len(train)
    train = [x for e in train for x in ((e.chosen, e.rejected) if isinstance(e, PreferenceExample) else (e,))]
    assert all(len(e.input_ids) == len(e.labels) <= cfg.max_seq_len for e in train)
    assert all(any(y != -100 for y in e.labels[1:]) for e in train)  # every kept example trains something


@settings(FUZZ, max_examples=250)
@given(st.lists(records, min_size=0, max_size=4), data_configs)
def test_records_give_examples_or_a_data_error(tokenizer, rows, cfg):
    _prepare(cfg, tokenizer, records=rows)


valid_record = st.sampled_from([
    {"instruction": "Spell tiger.", "output": "TIGER"},
    {"prompt": "2+2=", "completion": "4"},
    {"text": "The quick brown fox."},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
])
lines = (valid_record.map(json.dumps) | records.map(lambda r: json.dumps(r, default=str))
         | st.text(max_size=40) | st.sampled_from(["", "{", "[]", "null", "NaN", '{"text": "\\ud800"}', "\ufeff{}"]))


@settings(FUZZ, max_examples=150)
@given(st.lists(lines, max_size=5), st.binary(max_size=8), data_configs)
def test_jsonl_files_give_examples_or_a_data_error(tokenizer, tmp_path_factory, rows, tail, cfg):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_bytes("\n".join(rows).encode("utf-8", "surrogatepass") + tail)
    cfg.train_file = str(path)
    _prepare(cfg, tokenizer)
