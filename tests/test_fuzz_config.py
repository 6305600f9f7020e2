"""Property-based fuzzing of YAML config files as a user writes them: repeated keys and sections, numbers out
of their declared range, wrong types, huge integers, unknown keys and names from other tools, nested garbage.
``load_train_config`` either returns a config that validates or raises a ConfigError naming the file; a file
with a defect we planted (a duplicate, an out-of-range number) is never accepted, and ``qlora-kit validate``
on it never exits 0. Configs built in Python go through ``validate()`` with the same outcome. 760 cases."""
from __future__ import annotations

import dataclasses
import re
import typing

import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st
from test_fuzz import FUZZ

from qlora_kit.cli import main
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
from qlora_kit.config_aliases import ALIASES

SECTIONS = {"model": ModelConfig, "quant": QuantConfig, "lora": LoraConfig, "data": DataConfig,
            "training": TrainingConfig}
FIELDS = {name: {f.name: f for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()}

identifiers = st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True)
keys = st.sampled_from(sorted({f for fs in FIELDS.values() for f in fs})) | st.sampled_from(sorted(ALIASES)) | identifiers
numbers = (st.integers(-3, 70_000) | st.integers(-(10**40), 10**40) | st.sampled_from([2**31, 2**32, 2**63, 10**30])
           | st.floats(allow_nan=True, allow_infinity=True)).map(str)
texts = (numbers | st.sampled_from(["1.0e-4", "0.5", "1.5", "-0.0", ".nan", ".inf", "-.inf", "1e400", "9" * 5000,
                                    "nf4", "fp4", "adamw", "cosine", "all-linear", "demo", "bf16", "auto", "on", "no",
                                    "~", "''", "\"x\"", "[q_proj, v_proj]", "[0, 1]", "[]", "{}", "{a: {b: [1, {c: 2}]}}",
                                    "2024-13-45", "!!binary aGk=", "!!python/object:os.system x", "&a [*a]", "*x",
                                    "[", "{a", "? [a]", "@x", "`x", "|", "0x1F", "0o17", "1_000", "12:30:00"])
         | identifiers)
# wild: sections in order (a name may repeat), each a list of (key, YAML value text) (a key may repeat)
wild_documents = st.lists(st.tuples(st.sampled_from(sorted(SECTIONS)) | identifiers,
                                    st.lists(st.tuples(keys, texts), max_size=4)), max_size=5)
CHOICES = {"quant_type": ["nf4", "fp4"], "quant_storage": ["uint8", "bfloat16"], "init": ["kaiming", "gaussian"],
           "target_modules": ["all-linear", "[q_proj, v_proj]"], "rank_sampling": ["uniform", "log_uniform"],
           "compute_dtype": ["auto", "bf16", "fp32"], "offload": ["none", "cpu", "disk"], "device": ["cpu", ""],
           "format": ["auto", "chat", "text"], "optimizer": ["adamw", "paged_adamw_8bit"],
           "scheduler": ["cosine", "linear", "constant"], "gradient_checkpointing": ["on", "off", "auto"],
           "on_nonfinite": ["stop", "skip"], "distributed": ["ddp", "fsdp"], "layers": ["[0, 1]", "~"],
           "modules_to_save": ["[lm_head]", "[]"]}


def _plausible_value(section: str, key: str) -> st.SearchStrategy[str]:
    """Mostly valid values for one of our keys, numbers near and past the ends of their range."""
    spec, hint = FIELDS[section][key], typing.get_type_hints(SECTIONS[section])[key]
    if key in CHOICES:
        return st.sampled_from(CHOICES[key])
    if hint is bool:
        return st.sampled_from(["true", "false"])
    if hint in (int, float):
        low, high = (float(x) for x in re.match(r"^.(\S+), (\S+).$", spec.metadata["range"]).groups())
        top = min(high, low + 100)
        if hint is int:
            return st.integers(int(low) - 2, int(top) + 2).map(str)
        return st.floats(low - 0.5, top + 0.5).map(lambda x: f"{x:.6e}")  # 1.500000e-01: a YAML float
    return identifiers


plausible_documents = st.lists(st.sampled_from(sorted(SECTIONS)), unique=True, max_size=5).flatmap(
    lambda names: st.tuples(*[st.tuples(st.just(name), st.lists(st.sampled_from(sorted(FIELDS[name])), unique=True,
                                                                 max_size=4).flatmap(
        lambda ks, name=name: st.tuples(*[st.tuples(st.just(k), _plausible_value(name, k)) for k in ks]).map(list)))
        for name in names]).map(list))
documents = plausible_documents | wild_documents


def _render(doc, base: bool) -> str:
    """YAML text of ``doc``; with ``base`` the required model.path and data.train_file are added where absent."""
    doc = [(name, list(items)) for name, items in doc]
    for section, key, value in (("model", "path", "m"), ("data", "train_file", "d.jsonl")):
        if base:
            items = next((items for name, items in doc if name == section), None)
            if items is None:
                doc.append((section, [(key, value)]))
            elif key not in {k for k, _ in items}:
                items.insert(0, (key, value))
    return "".join(f"{name}:\n" + "".join(f"  {k}: {v}\n" for k, v in items) if items else f"{name}: {{}}\n"
                   for name, items in doc)


def _in(value: float, interval: str) -> bool:
    left, low, high, right = re.match(r"^([\[(])(\S+), (\S+)([\])])$", interval).groups()
    low, high = float(low), float(high)
    return (low <= value if left == "[" else low < value) and (value <= high if right == "]" else value < high)


def _planted_defect(doc) -> str | None:
    """A defect the loader must refuse: a repeated section or key, or a number outside a field's range."""
    names = [name for name, _ in doc]
    if len(set(names)) < len(names):
        return "duplicate section"
    for name, items in doc:
        written = [k for k, _ in items]
        if len(set(written)) < len(written):
            return "duplicate key"
        for key, text in items:
            spec = FIELDS.get(name, {}).get(key)
            if spec is None or "range" not in spec.metadata:
                continue
            try:
                value = yaml.safe_load(text)
            except (yaml.YAMLError, ValueError):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                try:
                    inside = _in(float(value), spec.metadata["range"])
                except OverflowError:
                    inside = False
                if not inside:
                    return f"{name}.{key} out of range"
    return None


@settings(FUZZ, max_examples=600)
@given(documents, st.sampled_from([True, True, True, False]))
def test_yaml_config_files_give_a_valid_config_or_a_config_error(tmp_path_factory, doc, base):
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_text(_render(doc, base), encoding="utf-8")
    defect = _planted_defect(doc)
    try:
        config = load_train_config(path)
    except ConfigError as e:
        assert str(e).startswith(str(path)) and "Traceback" not in str(e)
        event(f"refused ({defect or 'other'})")
        return
    event("accepted")
    assert defect is None, f"accepted a file with a {defect}:\n{path.read_text()}"
    config.validate()
    assert from_dict(TrainConfig, to_dict(config)) == config


@settings(FUZZ, max_examples=60)
@given(documents, st.sampled_from(["duplicate key", "duplicate section", "out of range"]), st.sampled_from(sorted(FIELDS)))
def test_cli_validate_never_exits_0_on_an_invalid_file(tmp_path_factory, capsys, doc, defect, section):
    doc = list(doc)
    if defect == "duplicate section":
        doc += [(section, []), (section, [])]
    elif defect == "duplicate key":
        doc.append((section, [("x", "1"), ("x", "2")]))
    else:
        key, spec = next((k, f) for k, f in FIELDS["training"].items() if "range" in f.metadata)
        doc.append(("training", [(key, "-1" if spec.metadata["range"].startswith("[0") else "0")]))
    path = tmp_path_factory.mktemp("cli") / "config.yaml"
    path.write_text(_render(doc, True), encoding="utf-8")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}") and "Traceback" not in err


numeric_values = (st.integers() | st.integers(min_value=-(10**400), max_value=10**400) | st.floats() | st.booleans()
                  | st.none() | st.text(max_size=5) | st.lists(st.integers(), max_size=2))


@settings(FUZZ, max_examples=100)
@given(st.sampled_from(sorted(SECTIONS)).flatmap(
    lambda name: st.tuples(st.just(name), st.dictionaries(st.sampled_from(sorted(FIELDS[name])), numeric_values,
                                                           max_size=4))))
def test_configs_built_in_python_validate_or_raise_a_config_error(section_and_values):
    name, values = section_and_values
    config = TrainConfig(model=ModelConfig(path="m"), data=DataConfig(train_file="d"))
    setattr(config, name, dataclasses.replace(getattr(config, name), **values))
    try:
        config.validate()
    except ConfigError as e:
        assert str(e)
        return
    hints = typing.get_type_hints(SECTIONS[name])
    for key, value in values.items():  # accepted: every numeric value is a number in its declared range
        interval = FIELDS[name][key].metadata.get("range")
        if interval and hints[key] in (int, float):
            assert not isinstance(value, bool) and _in(float(value), interval)
