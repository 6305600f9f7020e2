"""SentencePiece-style tokenizers (Gemma, Llama 2, Mistral v0.1) as GGUF's ``llama`` tokenizer model, read from
the Hugging Face fast tokenizer alone (no ``sentencepiece`` runtime, no ``tokenizer.model`` file).

llama.cpp's SPM tokenizer turns spaces into "▁" (after one leading space when ``add_space_prefix``), splits the
text into characters, and repeatedly merges the adjacent pair whose concatenation is a vocabulary token with the
highest score; characters left without a token fall back to ``<0xXX>`` byte tokens. A BPE tokenizer with byte
fallback (what transformers converts SentencePiece BPE models into) merges by rank instead, so each token's score
is minus the rank of the first merge that produces it: the same order. A Unigram tokenizer carries its own log-
probability scores, written as they are. The merges are written too, for readers that rebuild BPE from them
(transformers' GGUF loader); llama.cpp ignores them.
"""
from __future__ import annotations

import re

from qlora_kit.merging.gguf_map import GgufError

# gguf.TokenType values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # "▁", SentencePiece's visible space
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-F]{2}>$")


def is_sentencepiece_style(model: dict) -> bool:
    """A Unigram model, or a BPE model with byte fallback (SentencePiece converted by transformers)."""
    return model.get("type") == "Unigram" or (model.get("type") == "BPE" and bool(model.get("byte_fallback")))


def _parts(node: dict | None) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return node.get("normalizers") or node.get("pretokenizers") or []
    return [node]


def add_space_prefix(backend: dict, where: str) -> bool:
    """Whether the tokenizer puts "▁" before the text, read from tokenizer.json's normalizer and pre-tokenizer.

    Accepted shapes: Replace(" " -> "▁") with an optional Prepend("▁") (Gemma; Llama 2 legacy), or a Metaspace
    pre-tokenizer that does not split words (Llama 2 / Mistral in transformers 5). Raises GgufError otherwise,
    since llama.cpp could not reproduce the tokenization."""
    norms, pres = _parts(backend.get("normalizer")), _parts(backend.get("pre_tokenizer"))
    replace = any(n.get("type") == "Replace" and n.get("content") == SPACE
                  and (n.get("pattern") or {}).get("String") == " " for n in norms)
    prepend = any(n.get("type") == "Prepend" and n.get("prepend") == SPACE for n in norms)
    meta = [p for p in pres if p.get("type") == "Metaspace"]
    others = [n.get("type") for n in norms if n.get("type") not in ("Replace", "Prepend")]
    # Gemma's Split(" ") runs after the normalizer has replaced every space: it never splits.
    others += [p.get("type") for p in pres if p.get("type") not in ("Metaspace", "Split")
               or (p.get("type") == "Split" and not replace)]
    if meta and (meta[0].get("split", True) or meta[0].get("replacement") != SPACE):
        others.append("Metaspace(split=true)")
    if others or not (replace or meta):
        raise GgufError(f"{where}: a SentencePiece-style tokenizer whose normalizer/pre-tokenizer ({others or 'none'}) "
                        "llama.cpp's SPM tokenizer cannot reproduce (it replaces spaces with '▁' and, optionally, "
                        "prepends one); convert the merged folder with llama.cpp's convert_hf_to_gguf.py")
    if meta:
        return meta[0].get("prepend_scheme", "always" if meta[0].get("add_prefix_space", True) else "never") != "never"
    return prepend


def _merge_pairs(model: dict) -> list[tuple[str, str]]:
    return [tuple(m) if not isinstance(m, str) else tuple(m.split(" ", 1)) for m in model.get("merges") or []]


def spm_scores(model: dict, texts: list[str]) -> list[float]:
    """One score per id: Unigram's own; for BPE, minus the rank of the first merge producing the token (others
    rank after every merge, by id, so llama.cpp only forms them last)."""
    if model.get("type") == "Unigram":
        scores = [float(s) for _, s in model["vocab"]]
        return scores + [0.0] * (len(texts) - len(scores))
    pairs = _merge_pairs(model)
    rank: dict[str, int] = {}
    for r, (a, b) in enumerate(pairs):
        rank.setdefault(a + b, r)
    return [-float(rank[t]) if t in rank else -float(len(pairs) + i) for i, t in enumerate(texts)]


def spm_token_types(tok, texts: list[str], padded: set[int]) -> list[int]:
    """llama.cpp token types: UNKNOWN, CONTROL (special added), USER_DEFINED (other added), BYTE (<0xXX>),
    UNUSED (placeholders for embedding rows without a token), NORMAL."""
    added = tok.added_tokens_decoder  # id -> AddedToken
    types = []
    for i, t in enumerate(texts):
        if i in padded:
            types.append(UNUSED)
        elif i == tok.unk_token_id:
            types.append(UNKNOWN)
        elif i in added:
            types.append(CONTROL if added[i].special else USER_DEFINED)
        elif _BYTE_TOKEN.match(t):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    return types


def spm_merges(model: dict) -> list[str]:
    """BPE merges as "left right" strings (empty for Unigram)."""
    return [f"{a} {b}" for a, b in _merge_pairs(model)]


def check_byte_fallback(model: dict, texts: list[str], where: str) -> None:
    """A BPE with byte fallback must carry all 256 byte tokens, which llama.cpp falls back to."""
    if model.get("type") != "BPE":
        return
    have = {t for t in texts if _BYTE_TOKEN.match(t)}
    if len(have) != 256:
        raise GgufError(f"{where}: the tokenizer falls back to bytes but has {len(have)} of the 256 <0xXX> byte "
                        "tokens; llama.cpp needs all of them")
