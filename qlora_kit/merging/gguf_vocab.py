"""The tokenizer and the prompt contract in a GGUF: vocabulary, merges, token types, special ids, chat template;
and the Ollama ``Modelfile`` written beside the file.

The tokenizer is read with transformers (``AutoTokenizer``) from the folder the adapter was trained with (the
adapter's own tokenizer when saved beside it, else the base's), so added tokens and the chat template the adapter
learned are the ones exported.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from qlora_kit.merging.gguf_map import GgufError
from qlora_kit.merging.gguf_spm import (
    CONTROL,
    NORMAL,
    UNUSED,
    USER_DEFINED,
    add_space_prefix,
    check_byte_fallback,
    is_sentencepiece_style,
    spm_merges,
    spm_scores,
    spm_token_types,
)


@dataclasses.dataclass
class VocabInfo:
    """What was written, for the report and the Modelfile."""

    pre: str  # tokenizer.ggml.pre: llama.cpp's name for the pre-tokenizer's split rule
    n_tokens: int  # tokens in the tokenizer
    n_padded: int  # unused placeholder tokens added to reach the embedding rows
    special: dict  # bos/eos/unk/pad -> id
    add_bos: bool  # the tokenizer prepends BOS to a plain encode
    add_eos: bool  # ... appends EOS
    chat_template: str | None  # tokenizer.chat_template as written
    stop: list[str]  # texts that end a turn: EOS and the control tokens the chat template uses


def load_tokenizer(folder: Path):
    """``AutoTokenizer`` from ``folder``; GgufError when it has no fast (tokenizer.json-backed) tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    if not getattr(tok, "is_fast", False):
        raise GgufError(f"{folder}: the tokenizer has no fast (tokenizer.json) form; save it with transformers "
                        "(tokenizer.save_pretrained) so its vocabulary and merges can be exported")
    return tok


def pre_tokenizer_name(backend: dict, where: str) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, read from tokenizer.json's structure.

    Plain byte-level (GPT-2's split) is "gpt-2"; digits split one by one then byte-level is "smollm"; a Split
    regex followed by byte-level is named by matching the regex against transformers' table of GGUF split rules.
    """
    pre = backend.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
        except ImportError:
            GGUF_PRE_TOKENIZER_SPLITS = {}
        for name, known in GGUF_PRE_TOKENIZER_SPLITS.items():
            if regex == known:
                return name
    raise GgufError(f"{where}: tokenizer pre-tokenizer {kinds} is not one this exporter can name for llama.cpp "
                    "(byte-level BPE with GPT-2, SmolLM, Llama-3 or Qwen2 splitting); convert the merged folder with "
                    "llama.cpp's convert_hf_to_gguf.py")


def _merges(backend: dict) -> list[str]:
    """BPE merges as "left right" strings (a space inside a part written as U+0120+256, as gguf's SpecialVocab does)."""
    out = []
    for m in backend["model"].get("merges") or []:
        if isinstance(m, str):
            out.append(m)
        else:
            out.append(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in m))
    return out


def _tokens(tok, n_vocab: int, where: str) -> tuple[list[str], list[int], int]:
    """Token texts and types for ids 0..n_vocab-1; ids the tokenizer lacks become unused placeholders."""
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=True)  # text -> id
    if max(vocab.values()) >= n_vocab:
        raise GgufError(f"{where}: the tokenizer has ids up to {max(vocab.values())} but the model's embeddings have "
                        f"{n_vocab} rows; save the tokenizer that matches the model (resized embeddings?)")
    texts: list[str | None] = [None] * n_vocab
    for text, i in vocab.items():
        texts[i] = text
    added = tok.added_tokens_decoder  # id -> AddedToken
    types = [(CONTROL if added[i].special else USER_DEFINED) if i in added else NORMAL for i in range(n_vocab)]
    padded = 0
    for i, t in enumerate(texts):
        if t is None:
            texts[i], types[i], padded = f"[PAD{i}]", UNUSED, padded + 1
    return texts, types, padded


def _adds(tok) -> tuple[bool, bool]:
    """Whether a plain encode adds BOS / EOS (probed, so it holds for any post-processor)."""
    with_special, plain = tok("a").input_ids, tok("a", add_special_tokens=False).input_ids
    bos = tok.bos_token_id is not None and len(with_special) > len(plain) and with_special[0] == tok.bos_token_id
    eos = tok.eos_token_id is not None and len(with_special) > len(plain) and with_special[-1] == tok.eos_token_id
    return bool(bos), bool(eos)


def _add_sentencepiece(writer, tok, backend: dict, n_vocab: int, where: str) -> tuple[str, int]:
    """GGUF's ``llama`` (SPM) tokenizer: tokens, scores, types, merges, space prefix. Returns (pre, padded)."""
    model = backend["model"]
    prefix = add_space_prefix(backend, where)
    texts, types, padded = _tokens(tok, n_vocab, where)
    check_byte_fallback(model, texts, where)
    pads = {i for i, t in enumerate(types) if t == UNUSED}
    writer.add_tokenizer_model("llama")
    writer.add_token_list(texts)
    writer.add_token_scores(spm_scores(model, texts))
    writer.add_token_types(spm_token_types(tok, texts, pads))
    if model.get("type") == "BPE":
        writer.add_token_merges(spm_merges(model))
    writer.add_add_space_prefix(prefix)
    return "default", padded


def add_tokenizer_metadata(writer, tok, folder: Path, n_vocab: int) -> VocabInfo:
    """Write the tokenizer ``tok`` (loaded from ``folder``: tokens, types, merges or scores, special ids, add-BOS/EOS
    flags and chat template) into ``writer``: byte-level BPE as GGUF's ``gpt2`` model, SentencePiece-style (BPE
    with byte fallback, Unigram) as its ``llama`` model. Raises GgufError for a tokenizer GGUF cannot describe."""
    backend = json.loads(tok.backend_tokenizer.to_str())
    model = backend.get("model") or {}
    if is_sentencepiece_style(model):
        pre, padded = _add_sentencepiece(writer, tok, backend, n_vocab, str(folder))
    elif model.get("type") == "BPE":
        pre = pre_tokenizer_name(backend, str(folder))
        texts, types, padded = _tokens(tok, n_vocab, str(folder))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(texts)
        writer.add_token_types(types)
        writer.add_token_merges(_merges(backend))
    else:
        raise GgufError(f"{folder}: a {model.get('type')} tokenizer cannot be exported (byte-level BPE, BPE with byte "
                        "fallback and Unigram can); convert the merged folder with llama.cpp's convert_hf_to_gguf.py")
    special = {k: getattr(tok, f"{k}_token_id") for k in ("bos", "eos", "unk", "pad")}
    special = {k: v for k, v in special.items() if v is not None}
    for kind, i in special.items():
        getattr(writer, f"add_{kind}_token_id")(i)
    add_bos, add_eos = _adds(tok)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    if template:
        writer.add_chat_template(template)
    return VocabInfo(pre, len(tok), padded, special, add_bos, add_eos, template, _stop_texts(tok, template))


def _render(tok, messages: list[dict]) -> str | None:
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template may refuse a role (e.g. no system turn); the caller falls back
        return None


_USER, _SYSTEM = "\x00QLORA_USER\x00", "\x00QLORA_SYSTEM\x00"


def _stop_texts(tok, template: str | None) -> list[str]:
    """EOS plus every control token the chat template writes (e.g. <|im_start|>, <|im_end|>)."""
    stops = [tok.eos_token] if tok.eos_token else []
    text = _render(tok, [{"role": "user", "content": _USER}]) if template else None
    for t in tok.all_special_tokens:
        if text and t in text and t not in stops and t != tok.bos_token:
            stops.append(t)
    return stops


def modelfile_text(gguf_name: str, tok, info: VocabInfo) -> str:
    """An Ollama Modelfile: FROM the file, a single-turn TEMPLATE rendered from the chat template, stop tokens.

    The TEMPLATE is the chat template itself, rendered with placeholders for the system and user text and then
    turned into Go template fields, so Ollama prompts exactly as training did (a default system prompt included).
    """
    lines = [f"# Written by qlora-kit export. Create the model with: ollama create NAME -f {gguf_name.rsplit('.', 1)[0]}.Modelfile",
             f"FROM ./{gguf_name}"]
    if info.chat_template:
        plain = _render(tok, [{"role": "user", "content": _USER}])
        with_sys = _render(tok, [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _USER}])
        if plain is not None and _USER in plain:
            go = plain.replace(_USER, "{{ .Prompt }}")
            if with_sys is not None and _SYSTEM in with_sys:
                go = ("{{ if .System }}" + with_sys.replace(_SYSTEM, "{{ .System }}").replace(_USER, "{{ .Prompt }}")
                      + "{{ else }}" + go + "{{ end }}")
            lines.append(f'TEMPLATE """{go}"""')
        else:
            lines.append("# the chat template (in the GGUF as tokenizer.chat_template) could not be rendered for Ollama")
    else:
        lines.append("# no chat template: prompts are passed through as plain text")
    lines += [f'PARAMETER stop "{s}"' for s in info.stop]
    return "\n".join(lines) + "\n"
