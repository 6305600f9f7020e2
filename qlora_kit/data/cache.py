"""The token cache: one tokenized source as a safetensors file, keyed by its bytes, the tokenizer and the settings."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from qlora_kit.atomic import atomic_write_bytes
from qlora_kit.config import DataConfig
from qlora_kit.data import IGNORE_INDEX
from qlora_kit.data.tokenize import Example, TokenizedSource

log = logging.getLogger("qlora_kit")

CACHE_VERSION = "1"  # bump when tokenization or masking rules change


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about the tokenizer that changes tokens: vocabulary, chat template, EOS/BOS ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    for part in (type(tokenizer).__name__, vocab, str(getattr(tokenizer, "chat_template", None)),
                 str(tokenizer.eos_token_id), str(tokenizer.bos_token_id)):
        h.update(part.encode("utf-8") + b"\0")
    return h.hexdigest()


def cache_path(cache_dir: Path, content: bytes, tokenizer_fp: str, cfg: DataConfig, fmt: str) -> Path:
    """Where the tokenized ``content`` lives: a key over the bytes, the tokenizer and the tokenizing settings."""
    settings = {"v": CACHE_VERSION, "format": fmt, "max_seq_len": cfg.max_seq_len,
                "train_on_prompt": cfg.train_on_prompt, "system_prompt": cfg.system_prompt}
    h = hashlib.sha256(content)
    h.update(tokenizer_fp.encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return cache_dir / f"{h.hexdigest()[:40]}.safetensors"


def save_cache(path: Path, tok: TokenizedSource) -> None:
    """Write ``tok`` atomically: flat token ids, a supervised flag per token, example offsets, record indices."""
    from safetensors.numpy import save

    lengths = [len(e.input_ids) for e in tok.examples]
    tensors = {
        "input_ids": np.asarray([t for e in tok.examples for t in e.input_ids], dtype=np.int32),  # [tokens]
        "supervised": np.asarray([y != IGNORE_INDEX for e in tok.examples for y in e.labels], dtype=np.uint8),
        "offsets": np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),  # [examples + 1]
        "record_index": np.asarray(tok.record_index, dtype=np.int64),  # [examples]
    }
    atomic_write_bytes(path, save(tensors, metadata={"counts": json.dumps(tok.counts)}))


def load_cache(path: Path) -> TokenizedSource | None:
    """The cached source, or None (with a warning) when the file is unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            counts = json.loads(f.metadata()["counts"])
            ids, sup, off, rec = (f.get_tensor(k) for k in ("input_ids", "supervised", "offsets", "record_index"))
    except Exception as e:  # a damaged cache is only a lost shortcut
        log.warning("token cache %s is unreadable (%s); tokenizing again", path, e)
        return None
    labels = np.where(sup.astype(bool), ids, IGNORE_INDEX)  # [tokens]
    examples = [Example(ids[a:b].tolist(), labels[a:b].tolist()) for a, b in zip(off[:-1], off[1:])]
    return TokenizedSource(examples, rec.tolist(), counts)
