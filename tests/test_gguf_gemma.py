"""GGUF export of Gemma 2 / Gemma 3 and of SentencePiece-style tokenizers: tiny random models (built from a config,
with a tokenizer built in code) + a random adapter, exported f16 and q8_0, read back with gguf's reader (names,
shapes, metadata, tokenizer, chat template), loaded with transformers' GGUF loader (logits against the fp32 merge
at each type's tolerance), and run by llama.cpp (greedy tokens identical for f16) when llama-cpp-python is there."""
import json

import pytest
import torch
from test_gguf_export import _field, _hf_logits, _rel
from test_merge import PROMPTS, _random_adapter, _tensors

from qlora_kit import export_gguf, merge_and_export
from qlora_kit.merging.gguf_map import GgufError
from qlora_kit.merging.gguf_verify import TOLERANCES
from qlora_kit.testing.tiny import build_spm_tokenizer, make_tiny_gemma

gguf = pytest.importorskip("gguf")

# longer than the tiny models' 6-token sliding window: the sliding layers mask differently from the full ones
LONG = "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris."
GEMMA_BLOCK = {2: ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "post_attention_norm", "ffn_norm",
                   "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm"]}
GEMMA_BLOCK[3] = GEMMA_BLOCK[2] + ["attn_q_norm", "attn_k_norm"]
# Gemma 2 with soft-capping values that matter at the tiny model's logit scale (~3.4), and that transformers' GGUF
# loader does not read (verification takes them from the source config; llama.cpp reads them from the file)
GEMMA2_CAPS = dict(attn_logit_softcapping=20.0, final_logit_softcapping=5.0)


@pytest.fixture(scope="module", params=[2, 3], ids=["gemma2", "gemma3"])
def gemma_export(request, tmp_path_factory):
    """A tiny Gemma (2 or 3) + random adapter: its fp32 merge, and f16 / q8_0 GGUF exports (verified)."""
    v = request.param
    root = tmp_path_factory.mktemp(f"gguf-gemma{v}")
    make_tiny_gemma(root / "base", version=v, **(GEMMA2_CAPS if v == 2 else {}))
    _random_adapter(root / "base", root / "ad")
    merge_and_export(root / "base", root / "ad", root / "merged", dtype="fp32", verify=False, progress=False)
    reports = {q: export_gguf(root / f"g-{q}.gguf", base=root / "base", adapter=root / "ad", quant=q,
                              prompts=PROMPTS + [LONG], progress=False) for q in ("f16", "q8_0")}
    return v, root, reports


def test_gemma_metadata_and_sentencepiece_tokenizer(gemma_export):
    from transformers import AutoTokenizer

    v, root, _ = gemma_export
    cfg = json.loads((root / "base" / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(root / "base"))
    r = gguf.GGUFReader(root / "g-q8_0.gguf")
    a = f"gemma{v}"
    expect = {"general.architecture": a, f"{a}.block_count": cfg["num_hidden_layers"], f"{a}.embedding_length": 64,
              f"{a}.attention.head_count": 2, f"{a}.attention.head_count_kv": 1, f"{a}.attention.key_length": 256,
              f"{a}.attention.value_length": 256, f"{a}.attention.sliding_window": 6,
              "tokenizer.ggml.model": "llama", "tokenizer.ggml.add_bos_token": True,
              "tokenizer.ggml.add_eos_token": False, "tokenizer.ggml.add_space_prefix": False,
              "tokenizer.ggml.bos_token_id": tok.bos_token_id, "tokenizer.ggml.eos_token_id": tok.eos_token_id,
              "tokenizer.ggml.unknown_token_id": tok.unk_token_id, "tokenizer.ggml.padding_token_id": tok.pad_token_id,
              "tokenizer.chat_template": tok.chat_template}
    assert {k: _field(r, k) for k in expect} == expect
    if v == 2:
        assert _field(r, "gemma2.attn_logit_softcapping") == pytest.approx(20.0)
        assert _field(r, "gemma2.final_logit_softcapping") == pytest.approx(5.0)
    else:  # the full-attention layers' theta (the sliding layers' 10000 is fixed in llama.cpp)
        assert _field(r, "gemma3.rope.freq_base") == pytest.approx(cfg["rope_parameters"]["full_attention"]["rope_theta"])
    assert _field(r, "tokenizer.ggml.tokens") == tok.convert_ids_to_tokens(list(range(len(tok))))
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[tok.unk_token_id] == 2 and set(types[4:260]) == {6}  # UNKNOWN; the 256 <0xXX> are BYTE
    assert {i for i, t in enumerate(types) if t == 3} == set(tok.all_special_ids) - {tok.unk_token_id}  # CONTROL
    # scores: minus the rank of the merge producing each token, so llama.cpp merges in the BPE's order
    backend = json.loads((root / "base" / "tokenizer.json").read_text())["model"]
    scores, vocab = _field(r, "tokenizer.ggml.scores"), backend["vocab"]
    for rank, (left, right) in enumerate(backend["merges"][:50]):
        assert scores[vocab[left + right]] >= -rank
    assert len(_field(r, "tokenizer.ggml.merges")) == len(backend["merges"])


def test_gemma_tensors_norms_stored_plus_one(gemma_export):
    v, root, _ = gemma_export
    merged = _tensors(root / "merged")
    n_layers = json.loads((root / "base" / "config.json").read_text())["num_hidden_layers"]
    names = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{n}.weight" for i in range(n_layers)
                                                           for n in GEMMA_BLOCK[v]}
    r = gguf.GGUFReader(root / "g-f16.gguf")
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == names  # tied: no output.weight, the runtime reuses token_embd
    pairs = [("output_norm", "model.norm"), ("blk.0.post_ffw_norm", "model.layers.0.post_feedforward_layernorm"),
             ("blk.1.ffn_norm", "model.layers.1.pre_feedforward_layernorm")]
    pairs += [("blk.0.attn_k_norm", "model.layers.0.self_attn.k_norm")] if v == 3 else []
    for gname, key in pairs:
        stored = torch.from_numpy(tensors[f"{gname}.weight"].data.copy())
        assert tensors[f"{gname}.weight"].tensor_type.name == "F32"
        torch.testing.assert_close(stored, merged[f"{key}.weight"] + 1.0, rtol=0, atol=0)  # Gemma: x * (1 + w)
    q = tensors["blk.0.attn_q.weight"]  # no llama-style row reordering for Gemma's NeoX rope
    ref = merged["model.layers.0.self_attn.q_proj.weight"]
    assert list(q.shape) == list(ref.shape)[::-1]
    assert torch.equal(torch.from_numpy(q.data.copy()).reshape(ref.shape), ref.half())


def test_gemma_logits_match_merged_model_in_transformers_and_llama_cpp(gemma_export):
    from transformers import AutoConfig, AutoModelForCausalLM

    v, root, reports = gemma_export
    ids = torch.tensor([[2, 5, 300, 17, 42, 99, 7, 250, 3, 64, 400, 301, 302]])  # [1, 13], past the window
    ref = _hf_logits(root / "merged", ids)
    src = json.loads((root / "base" / "config.json").read_text())
    for quant in ("f16", "q8_0"):
        path = root / f"g-{quant}.gguf"
        config = AutoConfig.from_pretrained(str(root), gguf_file=path.name)
        for k in (GEMMA2_CAPS if v == 2 else {}):  # fields transformers' GGUF loader leaves at default
            setattr(config, k, src[k])
        model = AutoModelForCausalLM.from_pretrained(str(root), gguf_file=path.name, config=config, dtype=torch.float32)
        with torch.no_grad():
            rel = _rel(model(input_ids=ids).logits, ref)
        assert rel <= TOLERANCES[quant], (quant, rel)
        ver = reports[quant]["verification"]
        assert ver["passed"] and not ver["adapter_lost"]
        assert ver["transformers"]["tokenizer_ids_identical"] == 1.0
        assert sorted(ver["transformers"]["config_from_source"]) == (sorted(GEMMA2_CAPS) if v == 2 else [])
        assert 0.9 < ver["transformers"]["logit_effect_retained"] < 1.1
    pytest.importorskip("llama_cpp")
    cpp = reports["f16"]["verification"]["llama_cpp"]  # llama.cpp itself: metadata, norms, windows, tokenizer
    assert cpp["tokenizer_ids_identical"] == 1.0 and cpp["generation_token_agreement"] == 1.0
    assert cpp["max_rel_logit_diff"] <= TOLERANCES["f16"]
    cpp8 = reports["q8_0"]["verification"]["llama_cpp"]
    assert cpp8["tokenizer_ids_identical"] == 1.0 and cpp8["max_rel_logit_diff"] < 0.1


def test_llama2_style_sentencepiece_tokenizer_round_trips(tmp_path):
    """Metaspace with a prefix space (Llama 2 / Mistral v0.1): add_space_prefix, and the same ids in both runtimes."""
    from transformers import LlamaForCausalLM

    from qlora_kit.testing.tiny import tiny_llama_config

    tok = build_spm_tokenizer("llama2")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(len(tok), bos_token_id=2, eos_token_id=1)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    # Text that starts with a space is the known exception: transformers' Metaspace then adds no second "▁", while
    # llama.cpp (like sentencepiece itself) always prepends one; the verification reports it as a disagreement.
    prompts = ["Hello world", "the quick brown fox", "März 2024: ☃ and ünïcödé", "a\nb  two  spaces"]
    report = export_gguf(tmp_path / "l.gguf", model=tmp_path / "m", quant="f16", prompts=prompts, progress=False)
    r = gguf.GGUFReader(tmp_path / "l.gguf")
    assert _field(r, "tokenizer.ggml.model") == "llama" and _field(r, "tokenizer.ggml.add_space_prefix") is True
    ver = report["verification"]
    assert ver["passed"] and ver["transformers"]["tokenizer_ids_identical"] == 1.0
    if "skipped" not in ver["llama_cpp"]:
        assert ver["llama_cpp"]["tokenizer_ids_identical"] == 1.0


def test_gemma_configs_llama_cpp_cannot_run_fail_before_any_write(tmp_path):
    base = make_tiny_gemma(tmp_path / "g", version=3)
    cfg = json.loads((base / "config.json").read_text())
    cases = [({"query_pre_attn_scalar": 128}, "query_pre_attn_scalar 128"),
             ({"final_logit_softcapping": 30.0}, "soft-capping"),
             ({"layer_types": ["full_attention"] * 6}, "layer_types"),
             ({"model_type": "gemma3"}, "multimodal Gemma 3")]
    for change, message in cases:
        (base / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(GgufError, match=message):
            export_gguf(tmp_path / "out" / "a.gguf", model=base, progress=False)
    g2 = make_tiny_gemma(tmp_path / "g2", version=2)
    cfg2 = json.loads((g2 / "config.json").read_text())
    (g2 / "config.json").write_text(json.dumps({**cfg2, "final_logit_softcapping": None}))
    with pytest.raises(GgufError, match="always applies both"):
        export_gguf(tmp_path / "out" / "a.gguf", model=g2, progress=False)
    assert not (tmp_path / "out").exists()


def test_unigram_tokenizer_written_with_its_own_scores(tmp_path):
    """A Unigram tokenizer (SentencePiece unigram, as T5-style vocabularies are) is written as GGUF's llama model
    with its log-probability scores as they are (llama.cpp merges by them; tokenization agreement is reported)."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from qlora_kit.testing.tiny import tiny_llama_config

    corpus = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris.", LONG] * 4
    t = Tokenizer(models.Unigram())
    t.normalizer = normalizers.Replace(" ", "\u2581")
    t.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=150, special_tokens=["<pad>", "<eos>", "<unk>"],
                                                               unk_token="<unk>", show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    LlamaForCausalLM(tiny_llama_config(len(tok))).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    export_gguf(tmp_path / "u.gguf", model=tmp_path / "m", quant="f16", verify=False, progress=False)
    r = gguf.GGUFReader(tmp_path / "u.gguf")
    vocab = json.loads(t.to_str())["model"]["vocab"]  # [[piece, log prob], ...] in id order
    assert _field(r, "tokenizer.ggml.model") == "llama" and "tokenizer.ggml.merges" not in r.fields
    assert _field(r, "tokenizer.ggml.tokens") == [p for p, _ in vocab]
    assert _field(r, "tokenizer.ggml.scores") == pytest.approx([s for _, s in vocab], rel=1e-6)
    assert _field(r, "tokenizer.ggml.token_type")[tok.unk_token_id] == 2
