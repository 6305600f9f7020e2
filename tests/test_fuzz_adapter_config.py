"""Property-based fuzzing of adapter folders: adapter_config.json (wrong types, missing keys, extreme numbers,
lists, nested junk, raw bytes) and the tensors' shapes and dtypes, against a tiny saved rank-4 adapter. The only
outcomes allowed are a ConfigError (or AdapterMismatchError) whose one-line message names the file, or an adapter
that loads; the merge and adapter-resize commands on invalid input exit 2, never 0. 520 generated cases."""
from __future__ import annotations

import itertools
import json
import math
import shutil

import pytest
import torch
from conftest import load_tiny
from hypothesis import event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_fuzz import FUZZ, texts, values

from qlora_kit.cli import main
from qlora_kit.config import ConfigError
from qlora_kit.model.adapter_check import CONFIG_FILE, PREFIX, WEIGHTS_FILE, check_adapter
from qlora_kit.model.adapters import AdapterMismatchError, load_adapter
from qlora_kit.model.lora import lora_layers

KEYS = ["peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "target_modules",
        "layers_to_transform", "modules_to_save", "rank_pattern", "alpha_pattern", "bias", "task_type"]
extremes = st.sampled_from([0, -1, 1, 3, 4, 5, 8, 2**31, 10**6, 10**30, -(10**30), 10**400, 1e308, math.inf, -math.inf,
                            math.nan, 4.0, 0.5, True, False, None, "", "4", "LORA", "none", "all-linear", [], {}, [4],
                            ["q_proj"], [0, 1], {"q_proj": 2}])
field_values = extremes | values
_names = itertools.count()


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    model, _ = load_tiny(tiny_model_dir)
    return model


@pytest.fixture(scope="module")
def valid_config(tiny_adapter_dir):
    return json.loads((tiny_adapter_dir / CONFIG_FILE).read_text())


@pytest.fixture
def folder(tiny_adapter_dir, tmp_path):
    """A copy of the tiny adapter whose files each case of one test overwrites."""
    return shutil.copytree(tiny_adapter_dir, tmp_path / "adapter")


def _dump(doc) -> bytes:
    return doc if isinstance(doc, bytes) else json.dumps(doc, default=str).encode("utf-8", "surrogatepass")


def _refused(error: Exception, folder) -> None:
    message = str(error)
    event(f"refused: {type(error).__name__}")
    assert str(folder) in message and "\n" not in message


def _loads(model, folder) -> None:
    """Loading an accepted adapter works, and its tensors and scale are what the files say."""
    spec = check_adapter(folder)
    name = f"fuzz{next(_names)}"
    try:
        config = load_adapter(model, folder, name=name, activate=False)
    except AdapterMismatchError as e:  # a shape that is consistent in itself but not this model's
        _refused(e, folder)
        return
    event("loaded")
    assert config.r == spec.config.r and math.isfinite(config.scaling) and config.scaling > 0
    layers = [layer.adapters[name] for _, layer in lora_layers(model) if name in layer.adapters]
    assert layers and all(a.lora_A.shape[0] == config.r == a.lora_B.shape[1] for a in layers)


def _mutate(base: dict, edits: dict, drops: list[str]) -> dict:
    return {**{k: v for k, v in base.items() if k not in drops}, **edits}


documents = st.one_of(
    st.tuples(st.dictionaries(st.sampled_from(KEYS) | texts, field_values, max_size=4), st.lists(st.sampled_from(KEYS),
                                                                                                  max_size=3)),
    values, st.binary(max_size=40), st.text(max_size=40).map(str.encode))


@settings(FUZZ, max_examples=300)
@given(documents)
def test_fuzzed_adapter_config_is_refused_or_loads(model, valid_config, folder, doc):
    doc = _mutate(valid_config, *doc) if isinstance(doc, tuple) else doc
    (folder / CONFIG_FILE).write_bytes(_dump(doc))
    try:
        spec = check_adapter(folder)
    except ConfigError as e:
        _refused(e, folder)
        return
    assert spec.config.r == 4  # the tensors' rank: any other r is refused
    _loads(model, folder)


dtypes = (st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64])
          | st.sampled_from([torch.int8, torch.int64, torch.bool]))
dims = st.sampled_from([0, 1, 3, 4, 5, 32, 64, 65, 128, 384])
# consistent pairs A [k, in], B [out, k] half of the time, so some cases get as far as loading
pairs = (st.tuples(st.tuples(dims, dims), st.tuples(dims, dims))
         | st.tuples(st.sampled_from([1, 4, 5]), st.sampled_from([64, 128, 384]), st.sampled_from([64, 128, 384]))
         .map(lambda t: ((t[0], t[1]), (t[2], t[0]))))


@settings(FUZZ, max_examples=120)
@given(pairs, st.sampled_from([None, None, 1, 3, 64]), dtypes, st.sampled_from([False, False, False, True]),
       st.sampled_from(["self_attn.q_proj", "mlp.down_proj", "mlp.nope", "lm_head"]))
def test_fuzzed_tensor_shapes_are_refused_or_load(model, valid_config, folder, shapes, r, dtype, only_a, module):
    a_shape, b_shape = shapes
    r = a_shape[0] if r is None else r  # None: the r of the tensors
    key = f"{PREFIX}{'model.layers.0.' if module != 'lm_head' else ''}{module}"
    tensors = {f"{key}.lora_A.weight": torch.zeros(a_shape, dtype=dtype)}
    if not only_a:
        tensors[f"{key}.lora_B.weight"] = torch.zeros(b_shape, dtype=dtype)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps({**valid_config, "r": r}))
    try:
        check_adapter(folder)
    except ConfigError as e:
        _refused(e, folder)
        return
    assert not only_a and a_shape[0] == r == b_shape[1] and 0 not in a_shape + b_shape and dtype.is_floating_point
    _loads(model, folder)


bad_values = {"r": [0, -1, 8, 10**6, 10**30, "4", 4.0, True, None, [], {}, "four"],
              "lora_alpha": [0, -1, "x", True, math.nan, math.inf, None, [], {}]}
invalid = st.one_of(
    st.sampled_from(sorted(bad_values)).flatmap(lambda k: st.tuples(st.just(k), st.sampled_from(bad_values[k]))),
    st.lists(field_values, max_size=3) | st.text(max_size=10) | st.integers() | st.none())


@settings(FUZZ, max_examples=100)
@given(invalid, st.sampled_from(["merge", "adapter-resize"]))
def test_merge_and_resize_on_invalid_adapter_config_exit_2(tiny_model_dir, tiny_adapter_dir, valid_config,
                                                           tmp_path_factory, capsys, bad, command):
    work = tmp_path_factory.mktemp("cli")
    adapter = shutil.copytree(tiny_adapter_dir, work / "adapter")
    doc = {**valid_config, bad[0]: bad[1]} if isinstance(bad, tuple) else bad
    (adapter / CONFIG_FILE).write_bytes(_dump(doc))
    out = work / "out"
    args = (["merge", "--base", str(tiny_model_dir), "--no-verify"] if command == "merge" else
            ["adapter-resize", "--rank", "2"]) + ["--adapter", str(adapter), "--out", str(out)]
    assert main(args) == 2  # never 0; anything but a user error would raise out of main
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and not out.exists()
