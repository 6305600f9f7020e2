"""Tiny random Llama checkpoints with a real tokenizer, built locally (tests, benchmarks, scale runs)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris.",
    "Convert the date 2024-03-05 to words: March fifth, 2024.", "0123456789 abcdefghijklmnopqrstuvwxyz",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ {}[]():;,.!?-+*/=_'\"", "user assistant system instruction input output",
]


def build_tokenizer(vocab_size: int = 384, chat_template: bool = True):
    """A byte-level BPE tokenizer with ChatML special tokens and a chat template (no download).

    ``chat_template=False`` builds a base-model-like variant instead: no chat template, and the BOS token put
    before plain text (as Llama and Gemma base tokenizers do).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    if not chat_template:
        bos = ("<|im_start|>", tok.token_to_id("<|im_start|>"))
        tok.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", pair="<|im_start|> $A $B",
                                                           special_tokens=[bos])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE if chat_template else None
    return fast


def tiny_llama_config(vocab_size: int, **overrides):
    """A LlamaConfig small enough for unit tests (about 0.2M parameters by default)."""
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False, rms_norm_eps=1e-5)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def make_tiny_model(out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32, chat_template: bool = True,
                    **config_overrides) -> Path:
    """Write a random tiny Llama (safetensors) plus tokenizer (``build_tokenizer(chat_template=...)``) to
    ``out_dir`` and return the folder."""
    from transformers import LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(chat_template=chat_template)
    config = tiny_llama_config(len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                               **config_overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "qlora_kit_tiny.json").write_text(json.dumps({"seed": seed}))
    return out_dir


def make_tiny_gemma3(out_dir: str | Path, vocab_size: int = 262_144, hidden_size: int = 64, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> Path:
    """Write a random 2-layer Gemma-3-shaped model with a large vocabulary (Gemma 3's 262k by default), tied
    embeddings, one sliding and one full attention layer, and the tiny BPE tokenizer; return the folder.

    Ids beyond the tokenizer's vocabulary exist only in the model: compare generated token ids, not text.
    """
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=hidden_size // 4, max_position_embeddings=512,
        sliding_window=64, layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    Gemma3ForCausalLM(config).to(dtype).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


GEMMA_CHAT_TEMPLATE = (
    "{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}"
    "\n{{ message['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_spm_tokenizer(style: str = "gemma", vocab_size: int = 320):
    """A SentencePiece-style tokenizer built in code (no download, no ``sentencepiece``): BPE with byte fallback,
    ids 0-3 <pad> <eos> <bos> <unk>, the 256 <0xXX> byte tokens, then learned pieces; BOS added to plain text.

    ``style="gemma"``: spaces become "▁" with no prefix space, Gemma's turn markers and chat template.
    ``style="llama2"``: a Metaspace pre-tokenizer that prepends "▁" (Llama 2 / Mistral v0.1), no chat template.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False)
    trainer_tok.train_from_iterator(_CORPUS * 4, trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    if style == "gemma":
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    if style == "gemma":
        fast.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
        fast.chat_template = GEMMA_CHAT_TEMPLATE
    return fast


def make_tiny_gemma(out_dir: str | Path, version: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32,
                    **config_overrides) -> Path:
    """Write a random tiny Gemma 2 or Gemma 3 (text) model with the SentencePiece-style tokenizer
    (``build_spm_tokenizer("gemma")``) and return the folder.

    Shapes follow what llama.cpp's gemma graphs fix: head_dim = query_pre_attn_scalar = 256 (so the query scale
    agrees), Gemma 2's alternating and Gemma 3's 5-sliding-1-full layer pattern; a sliding window of 6 tokens, so
    prompts longer than that exercise the sliding layers. Hidden 64, tied embeddings.
    """
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    out_dir = Path(out_dir)
    tok = build_spm_tokenizer("gemma")
    config_class, model_class = (Gemma2Config, Gemma2ForCausalLM) if version == 2 else (Gemma3TextConfig,
                                                                                         Gemma3ForCausalLM)
    kwargs = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2 if version == 2 else 6,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                  max_position_embeddings=256, sliding_window=6, tie_word_embeddings=True, initializer_range=0.1,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    kwargs.update(config_overrides)
    torch.manual_seed(seed)
    model = model_class(config_class(**kwargs)).to(dtype)
    with torch.no_grad():  # Gemma initializes norms to 0 (scale 1 + w = 1): randomize them to test the +1 shift
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.2)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir
