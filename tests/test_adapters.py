"""PEFT-format adapters: round trip, interop with PEFT both ways, mismatches, several named adapters."""
import json

import pytest
import torch
from conftest import load_tiny

from qlora_kit import LoraConfig, adapters_disabled, add_lora, load_adapter, save_adapter, set_active_adapters
from qlora_kit.model.adapters import AdapterMismatchError
from qlora_kit.model.lora import lora_layers


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for a in layer.adapters.values():
                a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.1)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def ids():
    return torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def test_round_trip_gives_identical_logits(tiny_model_dir, tmp_path, ids):
    model, _ = load_tiny(tiny_model_dir)
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    _randomize(model)
    ref = _logits(model, ids)
    save_adapter(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    fresh, _ = load_tiny(tiny_model_dir)
    assert not torch.equal(_logits(fresh, ids), ref)
    load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(_logits(fresh, ids), ref)


def test_peft_loads_our_adapter_and_we_load_peft_adapter(tiny_model_dir, tmp_path, ids):
    peft = pytest.importorskip("peft")
    model, _ = load_tiny(tiny_model_dir)
    add_lora(model, LoraConfig(r=4, alpha=16, layers=[1], modules_to_save=["lm_head"]))
    _randomize(model, seed=1)
    with torch.no_grad():
        model.lm_head.copies["default"].weight.mul_(1.5)
    ours = _logits(model, ids)
    save_adapter(model, tmp_path / "ours")
    base, _ = load_tiny(tiny_model_dir)
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "ours"))
    torch.testing.assert_close(_logits(peft_model, ids), ours, atol=1e-5, rtol=1e-5)

    # the other way: PEFT trains nothing, but random B makes the adapter non-trivial
    base2, _ = load_tiny(tiny_model_dir)
    pm = peft.get_peft_model(base2, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["k_proj", "up_proj"],
                                                    use_rslora=True))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    theirs = _logits(pm, ids)
    pm.save_pretrained(str(tmp_path / "theirs"))
    mine, _ = load_tiny(tiny_model_dir)
    load_adapter(mine, tmp_path / "theirs")
    torch.testing.assert_close(_logits(mine, ids), theirs, atol=1e-5, rtol=1e-5)


def test_adapter_from_another_base_is_a_clear_error(tiny_model_dir, tmp_path):
    from qlora_kit.testing.tiny import make_tiny_model

    other_dir = make_tiny_model(tmp_path / "wide", hidden_size=96, intermediate_size=160)
    other, _ = load_tiny(other_dir)
    add_lora(other, LoraConfig(r=4))
    save_adapter(other, tmp_path / "wide-ad")
    model, _ = load_tiny(tiny_model_dir)
    with pytest.raises(AdapterMismatchError, match="another model"):
        load_adapter(model, tmp_path / "wide-ad")
    assert not list(lora_layers(model))  # nothing was attached


def test_named_adapters_switch_and_disable(tiny_model_dir, tmp_path, ids):
    model, _ = load_tiny(tiny_model_dir)
    base_logits = _logits(model, ids)
    add_lora(model, LoraConfig(r=4), name="a")
    _randomize(model, seed=2)
    logits_a = _logits(model, ids)
    save_adapter(model, tmp_path / "a", name="a")
    fresh, _ = load_tiny(tiny_model_dir)
    load_adapter(fresh, tmp_path / "a", name="a")
    add_lora(fresh, LoraConfig(r=2, target_modules=["o_proj"]), name="b")
    with torch.no_grad():
        for _, layer in lora_layers(fresh):
            if "b" in layer.adapters:
                layer.adapters["b"].lora_B.normal_()
    logits_b = _logits(fresh, ids)
    assert not torch.allclose(logits_b, logits_a)
    set_active_adapters(fresh, ["a"])
    assert torch.equal(_logits(fresh, ids), logits_a)
    with adapters_disabled(fresh):
        assert torch.equal(_logits(fresh, ids), base_logits)
    assert torch.equal(_logits(fresh, ids), logits_a)
    with pytest.raises(KeyError, match="loaded adapters"):
        set_active_adapters(fresh, ["c"])


def test_missing_files_name_the_file(tmp_path, tiny_model_dir):
    from qlora_kit import ConfigError

    model, _ = load_tiny(tiny_model_dir)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="adapter_model.safetensors"):
        load_adapter(model, tmp_path / "bad")


def _adapter_with(tmp_path, source, edit):
    """A copy of the adapter at ``source`` whose adapter_config.json is ``edit(config)`` (a value or raw text)."""
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(source, out)
    new = edit(json.loads((out / "adapter_config.json").read_text()))
    (out / "adapter_config.json").write_text(new if isinstance(new, str) else json.dumps(new))
    return out


BAD_CONFIGS = {  # what is wrong -> (edit, a word the error must name)
    "a list": (lambda c: [c], "JSON object"),
    "r missing": (lambda c: {k: v for k, v in c.items() if k != "r"}, '"r"'),
    "r non-numeric": (lambda c: {**c, "r": "four"}, '"r"'),
    "r a string number": (lambda c: {**c, "r": "4"}, '"r"'),
    "r zero": (lambda c: {**c, "r": 0}, '"r"'),
    "r negative": (lambda c: {**c, "r": -4}, '"r"'),
    "r a bool": (lambda c: {**c, "r": True}, '"r"'),
    "r not matching the tensors": (lambda c: {**c, "r": 8}, '"r": 4'),
    "lora_alpha non-numeric": (lambda c: {**c, "lora_alpha": "x"}, '"lora_alpha"'),
    "lora_alpha a bool": (lambda c: {**c, "lora_alpha": True}, '"lora_alpha"'),
    "lora_alpha NaN": (lambda c: json.dumps({**c, "lora_alpha": float("nan")}), '"lora_alpha"'),
    "lora_alpha missing": (lambda c: {k: v for k, v in c.items() if k != "lora_alpha"}, '"lora_alpha"'),
    "target_modules a number": (lambda c: {**c, "target_modules": 5}, '"target_modules"'),
    "modules_to_save a string": (lambda c: {**c, "modules_to_save": "lm_head"}, '"modules_to_save"'),
    "layers_to_transform negative": (lambda c: {**c, "layers_to_transform": [-1]}, '"layers_to_transform"'),
    "lora_dropout 1": (lambda c: {**c, "lora_dropout": 1}, '"lora_dropout"'),
    "use_rslora a string": (lambda c: {**c, "use_rslora": "yes"}, '"use_rslora"'),
    "rank_pattern a list": (lambda c: {**c, "rank_pattern": [1]}, '"rank_pattern"'),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_adapter_config_is_one_config_error_naming_file_and_field(tiny_adapter_dir, tmp_path, case):
    from qlora_kit import ConfigError
    from qlora_kit.model.adapters import read_adapter

    edit, word = BAD_CONFIGS[case]
    bad = _adapter_with(tmp_path, tiny_adapter_dir, edit)
    with pytest.raises(ConfigError) as e:
        read_adapter(bad)
    message = str(e.value)
    assert str(bad / "adapter_config.json") in message and word in message and "\n" not in message


def test_rank_far_above_the_tensors_fails_fast_without_allocating(tiny_model_dir, tiny_adapter_dir, tmp_path):
    """r = 1,000,000 on a rank-4 file: refused from the header alone, under an address-space cap of +1 GiB."""
    import resource
    import time

    from qlora_kit import ConfigError

    bad = _adapter_with(tmp_path, tiny_adapter_dir, lambda c: {**c, "r": 1_000_000})
    model, _ = load_tiny(tiny_model_dir)
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, hard))  # the old code tried to allocate ~10 GB here
    try:
        start = time.perf_counter()
        with pytest.raises(ConfigError, match='"r": 4'):
            load_adapter(model, bad)
        assert time.perf_counter() - start < 5
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert not list(lora_layers(model))


@pytest.mark.parametrize("command", ["merge", "adapter-resize"])
def test_cli_on_a_wrong_rank_exits_2_and_writes_nothing(tiny_model_dir, tiny_adapter_dir, tmp_path, capsys, command):
    """merge --no-verify once exited 0 with the wrong scale when r did not match the tensors."""
    from qlora_kit.cli import main

    bad = _adapter_with(tmp_path, tiny_adapter_dir, lambda c: {**c, "r": 2})
    out = tmp_path / "out"
    args = (["merge", "--base", str(tiny_model_dir), "--no-verify"] if command == "merge" else
            ["adapter-resize", "--rank", "1"]) + ["--adapter", str(bad), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and '"r"' in err
    assert not out.exists()
