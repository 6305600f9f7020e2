"""offload_base: the disk-mapped 4-bit base trains exactly like the in-memory one, is file-backed, never pickled."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_tiny

from qlora_kit import LoraConfig, add_lora, merge_and_export, save_adapter
from qlora_kit.model.lora import LoraLinear
from qlora_kit.model.quant import is_4bit
from qlora_kit.offload.runtime import (
    DATA_NAME,
    INDEX_NAME,
    is_file_backed,
    map_offloaded,
    offload_base,
    stream_layers,
)


def _step(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _lora_model(path, **load):
    model, tok = load_tiny(path, **load)
    torch.manual_seed(0)
    add_lora(model, LoraConfig(r=4, alpha=8))
    with torch.no_grad():  # non-zero B so the adapters' gradients depend on the base weights everywhere
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model, tok


def _packed(model):
    from qlora_kit.offload.runtime import _layers

    return dict(_layers(model))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_disk_offload_gives_identical_loss_and_lora_grads(tiny_model_dir, tmp_path, fused, checkpointing):
    from qlora_kit.model.fused import set_fused

    set_fused(fused)
    try:
        ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(1))
        ref, _ = _lora_model(tiny_model_dir, gradient_checkpointing=checkpointing)
        ref.train()
        loss_ref, grads_ref = _step(ref, ids)
        model, _ = _lora_model(tiny_model_dir, gradient_checkpointing=checkpointing)
        model.train()
        before = {n: m.weight.data.clone() for n, m in _packed(model).items()}
        summary = offload_base(model, "disk", tmp_path / "off")
        assert summary["layers"] == len(before) == 14 and summary["bytes"] > 0
        for n, m in _packed(model).items():
            assert torch.equal(m.weight.data, before[n])
        loss, grads = _step(model, ids)
        assert torch.equal(loss, loss_ref)
        assert grads.keys() == grads_ref.keys() and len(grads) == 28
        for n in grads:
            assert torch.equal(grads[n], grads_ref[n]), n
    finally:
        set_fused(True)


def test_offloaded_weights_are_file_backed_and_index_is_json(tiny_model_dir, tmp_path):
    model, _ = load_tiny(tiny_model_dir)
    folder = tmp_path / "off"
    offload_base(model, "disk", folder)
    data = folder / DATA_NAME
    layers = _packed(model)
    index = json.loads((folder / INDEX_NAME).read_text())  # plain JSON
    assert index["total_bytes"] == data.stat().st_size
    for name, m in layers.items():
        w, st = m.weight, m.weight.quant_state
        assert is_file_backed(w.data, data), name
        assert is_file_backed(st.absmax, data) and is_file_backed(st.state2.absmax, data), name
        e = index["tensors"][f"{name}.weight"]
        assert e["shape"] == list(w.shape) and e["dtype"] == "uint8" and e["offset"] % 64 == 0
        assert index["tensors"][f"{name}.weight.state2.absmax"]["dtype"] == "float32"
    # an in-place write stays private (MAP_PRIVATE): the file is never modified
    raw = data.read_bytes()
    w0 = next(iter(layers.values())).weight
    w0.data[:4] += 1
    assert data.read_bytes() == raw
    # a fresh model maps the same file back without unpickling anything
    fresh, _ = load_tiny(tiny_model_dir)
    with pytest.MonkeyPatch.context() as mp:
        def refuse(*a, **k):
            raise AssertionError("unpickling")
        mp.setattr(pickle, "load", refuse)
        mp.setattr(pickle, "loads", refuse)
        mp.setattr(torch, "load", refuse)
        assert map_offloaded(fresh, folder) == index["total_bytes"]
    for m in _packed(fresh).values():
        assert is_file_backed(m.weight.data, data)


def test_save_merge_generate_after_offload(tiny_model_dir, tmp_path):
    from qlora_kit.inference.generate import generate

    ref, tok = _lora_model(tiny_model_dir)
    model, _ = _lora_model(tiny_model_dir)
    offload_base(model, "disk", tmp_path / "off")
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoraLinear)
    with torch.no_grad():
        want = generate(ref, tok, ["Hello there"], max_new_tokens=6)
        assert generate(model, tok, ["Hello there"], max_new_tokens=6) == want
        assert generate(model, tok, ["Hello there"], max_new_tokens=6, dequantize_once=False) == want
    save_adapter(model, tmp_path / "adapter")
    save_adapter(ref, tmp_path / "adapter_ref")
    for f in ("adapter_model.safetensors",):
        assert (tmp_path / "adapter" / f).read_bytes() == (tmp_path / "adapter_ref" / f).read_bytes()
    merge_and_export(tiny_model_dir, tmp_path / "adapter", tmp_path / "merged", dtype="fp32", verify=False,
                     progress=False, prompts=["Hi"])
    assert (tmp_path / "merged" / "config.json").is_file()


@pytest.mark.parametrize("prefetch", [True, False])
def test_cpu_mode_is_a_noop_and_stream_hooks_keep_results(tiny_model_dir, tmp_path, prefetch):
    ids = torch.randint(0, 384, (1, 10), generator=torch.Generator().manual_seed(2))
    ref, _ = _lora_model(tiny_model_dir)
    loss_ref, grads_ref = _step(ref, ids)
    model, _ = _lora_model(tiny_model_dir)
    assert offload_base(model, "cpu")["bytes"] == 0
    assert offload_base(model, "none")["bytes"] == 0
    offload_base(model, "disk", tmp_path / "off")
    handles = stream_layers(model, "cpu", prefetch=prefetch)  # the accelerator path, as a cpu->cpu copy
    assert len(handles) == 2 * 14
    loss, grads = _step(model, ids)
    assert torch.equal(loss, loss_ref)
    for n in grads:
        assert torch.equal(grads[n], grads_ref[n]), n
    for m in _packed(model).values():  # released back to the file-backed views after each forward
        assert is_file_backed(m.weight.data, tmp_path / "off" / DATA_NAME)
    with pytest.raises(ValueError):
        offload_base(model, "gpu")


_RSS_SCRIPT = r"""
import ctypes, gc, json, sys
sys.path.insert(0, sys.argv[3])
from conftest import load_tiny
from qlora_kit.offload.runtime import offload_base
from qlora_kit.model.load import footprint

def anon():
    gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

model, _ = load_tiny(sys.argv[1])
before = anon()
s = offload_base(model, "disk", sys.argv[2])
after = anon()
print(json.dumps({"before": before, "after": after, "offloaded": s["bytes"],
                  "quantized_bytes": footprint(model)["quantized_bytes"]}))
"""


def test_rss_anon_drops_by_the_packed_bytes(tmp_path):
    from qlora_kit.testing.tiny import make_tiny_model

    big = make_tiny_model(tmp_path / "big", hidden_size=1024, intermediate_size=2816, num_hidden_layers=4)
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(big), str(tmp_path / "off"),
                          str(Path(__file__).parent)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    r = json.loads(out.stdout.strip().splitlines()[-1])
    drop = r["before"] - r["after"]
    assert r["offloaded"] > 20 * 2**20
    assert drop > 0.8 * r["offloaded"], r


def test_config_field_and_train_with_disk_offload_match(tmp_path, tiny_model_dir):
    from test_train import _config

    from qlora_kit.config import ConfigError, load_train_config
    from qlora_kit.training.recipe import train

    with pytest.raises(ConfigError, match="model.offload"):
        load_train_config(None, [f"model.path={tiny_model_dir}", "data.train_file=x.jsonl", "model.offload=gpu"])
    plain = train(_config(tmp_path / "a", tiny_model_dir, max_steps=3), progress=False)
    cfg = _config(tmp_path / "b", tiny_model_dir, max_steps=3)
    cfg.model.offload = "disk"
    offloaded = train(cfg, progress=False)
    assert (Path(offloaded.output_dir) / ".offload" / DATA_NAME).is_file()
    assert offloaded.final_train_loss == plain.final_train_loss
    a = (plain.adapter_dir / "adapter_model.safetensors").read_bytes()
    assert (offloaded.adapter_dir / "adapter_model.safetensors").read_bytes() == a


def test_load_model_offload_disk(tiny_model_dir, tmp_path):
    model, _ = load_tiny(tiny_model_dir, offload="disk", offload_folder=tmp_path / "off")
    assert all(is_file_backed(m.weight.data, tmp_path / "off" / DATA_NAME) for m in _packed(model).values())


def test_planner_counts_two_layers_of_4bit_weights_when_offloaded(tiny_model_dir):
    from qlora_kit import plan_memory
    from qlora_kit.config import ConfigError

    plain = plan_memory(tiny_model_dir, compute_dtype="fp32")
    off = plan_memory(tiny_model_dir, compute_dtype="fp32", offload="disk")
    assert off.rows[0].bytes == pytest.approx(plain.rows[0].bytes)  # tiny model: 2 layers, all resident anyway
    big = dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
               num_attention_heads=64, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)
    p0, p1 = plan_memory(big), plan_memory(big, offload="disk")
    assert p1.rows[0].bytes == pytest.approx(p0.rows[0].bytes * 2 / 80)
    assert p0.total - p1.total == pytest.approx(p0.rows[0].bytes * 78 / 80)
    assert "disk-offloaded: 2 of 80 layers resident" in str(p1)
    with pytest.raises(ConfigError, match="offload"):
        plan_memory(big, offload="gpu")


def test_refuses_to_replace_a_folder_that_is_not_an_offload_folder(tiny_model_dir, tmp_path):
    model, _ = load_tiny(tiny_model_dir)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an offload folder"):
        offload_base(model, "disk", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    offload_base(model, "disk", tmp_path / "off")
    fresh, _ = load_tiny(tiny_model_dir)
    offload_base(fresh, "disk", tmp_path / "off")  # an earlier offload folder is replaced atomically
    assert sorted(p.name for p in (tmp_path / "off").iterdir()) == [INDEX_NAME, DATA_NAME]


@pytest.mark.parametrize("compute_dtype", ["fp32", "bf16"])
def test_streamed_disk_load_equals_the_transformers_4bit_loader(tiny_model_dir, tmp_path, compute_dtype):
    """load_model(offload="disk") quantizes tensor by tensor into the file; every weight and quant state, and
    a training step's loss and LoRA gradients, equal those of transformers' in-memory 4-bit load."""
    ref, _ = load_tiny(tiny_model_dir, compute_dtype=compute_dtype)
    off, _ = load_tiny(tiny_model_dir, compute_dtype=compute_dtype, offload="disk", offload_folder=tmp_path / "off")
    ref_params = dict(ref.named_parameters())
    assert sorted(n for n, _ in off.named_parameters()) == sorted(ref_params)
    for name, p in off.named_parameters():
        r = ref_params[name]
        assert p.dtype == r.dtype and torch.equal(p.data, r.data), name
        assert is_file_backed(p.data, tmp_path / "off" / DATA_NAME), name  # the head too (tied or not)
        if is_4bit(off.get_submodule(name.removesuffix(".weight"))):
            a, b = p.quant_state, r.quant_state
            assert (a.shape, a.blocksize, a.quant_type, a.dtype) == (b.shape, b.blocksize, b.quant_type, b.dtype)
            for t, u in ((a.absmax, b.absmax), (a.offset, b.offset), (a.code, b.code),
                         (a.state2.absmax, b.state2.absmax), (a.state2.code, b.state2.code)):
                assert torch.equal(t, u), name
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (ref, off):
        torch.manual_seed(0)
        add_lora(model, LoraConfig(r=4, alpha=8))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        results.append(_step(model, ids))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)


def test_streamed_folder_is_reused_only_for_the_same_source(tiny_model_dir, tmp_path):
    from qlora_kit.config import ConfigError

    folder = tmp_path / "off"
    load_tiny(tiny_model_dir, offload="disk", offload_folder=folder)
    stamp = (folder / DATA_NAME).stat().st_mtime_ns
    load_tiny(tiny_model_dir, offload="disk", offload_folder=folder)  # same checkpoint and settings: reused
    assert (folder / DATA_NAME).stat().st_mtime_ns == stamp
    index = json.loads((folder / INDEX_NAME).read_text())
    assert index["source"]["dtype"] == "float32" and "config" in index and index["quant_layers"]
    load_tiny(tiny_model_dir, compute_dtype="bf16", offload="disk", offload_folder=folder)  # other dtype: rewritten
    assert json.loads((folder / INDEX_NAME).read_text())["source"]["dtype"] == "bfloat16"
    with pytest.raises(ConfigError, match="quant.bits"):
        from qlora_kit.config import QuantConfig

        load_tiny(tiny_model_dir, quant=QuantConfig(bits=8), offload="disk", offload_folder=tmp_path / "o8")


def test_streamed_load_names_a_missing_tensor_and_leaves_no_folder(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from qlora_kit.config import ConfigError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shard = next(broken.glob("*.safetensors"))
    tensors = load_file(str(shard))
    missing = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
    del tensors[missing]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=missing.replace(".", r"\.")):
        load_tiny(broken, offload="disk", offload_folder=tmp_path / "off")
    assert not (tmp_path / "off").exists()
