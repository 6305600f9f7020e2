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
