"""``prepare_data``: read, check, tokenize (through the cache), mask and split the training data."""
from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qlora_kit.config import DataConfig
from qlora_kit.data import DataError
from qlora_kit.data.cache import cache_path, load_cache, save_cache, tokenizer_fingerprint
from qlora_kit.data.contract import prompt_contract
from qlora_kit.data.formats import FORMATS, detect_format
from qlora_kit.data.preference import PreferenceExample, as_pairs, tokenize_pairs
from qlora_kit.data.sources import Row, read_source
from qlora_kit.data.tokenize import Example, TokenizedSource, n_supervised, tokenize_source

log = logging.getLogger("qlora_kit")


@dataclass
class DataStats:
    """Counts over the prepared data (lengths are over training examples)."""

    examples: int = 0  # training examples kept (pairs, for preference data)
    eval_examples: int = 0  # validation examples kept (pairs, for preference data)
    records: int = 0  # records read, train and eval files together
    truncated: int = 0  # examples cut to max_seq_len
    dropped: int = 0  # examples with no supervised token left (empty, or prompt filled max_seq_len)
    tokens: int = 0  # training tokens (no padding; both sides of preference pairs)
    supervised_tokens: int = 0  # training tokens that are loss targets
    len_p50: int = 0  # median training example length in tokens
    len_p90: int = 0  # 90th percentile length
    len_p99: int = 0  # 99th percentile length
    len_max: int = 0  # longest training example
    padding_fraction: float | None = None  # padded slots / all slots in the batches (set by make_batches)

    def as_dict(self) -> dict:
        """A JSON-safe dict (for metrics and summaries)."""
        return asdict(self)


def _source_format(rows: list[Row], cfg: DataConfig, name: str) -> str:
    if not rows:
        raise DataError(f"{name}: no records (the data is empty); add training records")
    return cfg.format if cfg.format != "auto" else detect_format(rows[0][1], rows[0][0])


def _paired(fmt: str) -> bool:
    return fmt in FORMATS and FORMATS[fmt].paired


def _prepare_source(rows: list[Row], content: bytes, name: str, tokenizer: Any, cfg: DataConfig,
                    cache_dir: Path | None, tokenizer_fp: str) -> tuple[str, TokenizedSource]:
    """The source's format and its tokens, through the cache when ``cache_dir`` is set (preference records as
    chosen, rejected, chosen, ... examples)."""
    fmt = _source_format(rows, cfg, name)
    cache = cache_path(cache_dir, content, tokenizer_fp, cfg, fmt) if cache_dir else None
    if cache is not None and cache.is_file():
        hit = load_cache(cache)
        if hit is not None:
            log.info("%s: %d tokenized examples from cache %s", name, len(hit.examples), cache)
            return fmt, hit
    tok = (tokenize_pairs if _paired(fmt) else tokenize_source)(rows, fmt, tokenizer, cfg)
    if cache is not None and tok.examples:
        save_cache(cache, tok)
    return fmt, tok


def _check_not_empty(tok: TokenizedSource, name: str, cfg: DataConfig) -> None:
    c = tok.counts
    if tok.examples:
        return
    if c["truncated"]:
        raise DataError(f"{name}: all {c['records']} examples were dropped: {c['truncated']} were longer than "
                        f"data.max_seq_len={cfg.max_seq_len} and lost every response token to truncation; raise "
                        "data.max_seq_len or shorten the prompts")
    raise DataError(f"{name}: all {c['records']} examples were dropped: none has a response token to train on "
                    "(empty responses, or chat without assistant turns); fix the data or set data.train_on_prompt")


def _held_out(n_records: int, fraction: float, seed: int) -> set[int]:
    """Record indices held out for validation: a fixed-seed sample of ``round(fraction * n)`` (at least 1)."""
    if fraction <= 0:
        return set()
    n_eval = max(1, round(fraction * n_records))
    if n_eval >= n_records:
        raise DataError(f"data.eval_fraction={fraction} of {n_records} records leaves nothing to train on; "
                        "lower it or give data.eval_file")
    order = list(range(n_records))
    random.Random(seed).shuffle(order)
    return set(order[:n_eval])


def held_out_records(cfg: DataConfig, seed: int = 0) -> list[dict]:
    """The validation records as read, before tokenization: ``data.eval_file``'s, else the records of
    ``data.train_file`` that ``data.eval_fraction`` holds out (the split ``prepare_data`` makes with ``seed``),
    in file order; empty without either. Raises DataError as reading the file does."""
    if cfg.eval_file:
        return [record for _, record in read_source(cfg.eval_file, None, "eval_file")[0]]
    if cfg.eval_fraction <= 0:
        return []
    rows = read_source(cfg.train_file, None, "train_file")[0]
    held = _held_out(len(rows), cfg.eval_fraction, seed)
    return [record for i, (_, record) in enumerate(rows) if i in held]


def _fill_stats(stats: DataStats, train: list[Example]) -> None:
    lengths = np.asarray(sorted(len(e.input_ids) for e in train))
    stats.examples, stats.tokens = len(train), int(lengths.sum())
    stats.supervised_tokens = sum(n_supervised(e.labels) for e in train)
    stats.len_p50, stats.len_p90, stats.len_p99 = (int(np.percentile(lengths, q)) for q in (50, 90, 99))
    stats.len_max = int(lengths[-1])


def _log_stats(stats: DataStats, cfg: DataConfig) -> None:
    if stats.truncated or stats.dropped:
        log.warning("data: %d of %d examples truncated to data.max_seq_len=%d, %d dropped with no supervised "
                    "token left", stats.truncated, stats.records, cfg.max_seq_len, stats.dropped)
    # the counts and lengths are reported once, by the caller (``ValidationReport.summary``: validate prints it,
    # train logs it); at debug level here for the other callers
    log.debug("data: %d train / %d eval examples from %d records; %d truncated to %d tokens, %d dropped "
              "(no supervised token left); %d tokens (%d supervised); length p50/p90/p99/max %d/%d/%d/%d",
              stats.examples, stats.eval_examples, stats.records, stats.truncated, cfg.max_seq_len, stats.dropped,
              stats.tokens, stats.supervised_tokens, stats.len_p50, stats.len_p90, stats.len_p99, stats.len_max)


def _split(train_tok: TokenizedSource, name: str, fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Train and held-out examples of one source (the examples of a held-out record all go to eval)."""
    held = _held_out(train_tok.counts["records"], fraction, seed)
    pairs = list(zip(train_tok.record_index, train_tok.examples))
    train = [e for i, e in pairs if i not in held]
    evals = [e for i, e in pairs if i in held]
    if not train:
        raise DataError(f"{name}: the eval_fraction split left no training example; lower data.eval_fraction")
    return train, evals


Prepared = list[Example] | list[PreferenceExample]


def prepare_data(cfg: DataConfig, tokenizer: Any, cache_dir: Path | None = None, seed: int = 0, *,
                 records: Any = None, eval_records: Any = None) -> tuple[Prepared, Prepared, DataStats]:
    """Read, validate, tokenize, mask and split the data.

    Args:
        cfg: file names, format, max_seq_len, masking and the validation split.
        tokenizer: the model's tokenizer; its prompt contract (``data.contract``; set on the tokenizer here)
            renders chat, alpaca and prompt/completion records.
        cache_dir: where tokenized sources are cached (default ``cfg.cache_dir``; neither set: no cache).
        seed: fixes which records ``cfg.eval_fraction`` holds out.
        records / eval_records: a ``datasets.Dataset`` or list of dicts used instead of the files.
    Returns:
        ``(train, eval, stats)``; ``eval`` is empty without eval_file/eval_records and eval_fraction. Preference
        records (chosen/rejected) give lists of ``PreferenceExample``, other formats lists of ``Example``.
    Raises:
        DataError naming file, line and field for malformed records, an empty dataset, data where every
        example is too long for ``cfg.max_seq_len``, or preference records in one source but not the other.
    """
    prompt_contract(tokenizer, cfg, announce=False)  # the text layout, decided before the cache key reads the chat template
    cache_dir = Path(cache_dir) if cache_dir else (Path(cfg.cache_dir) if cfg.cache_dir else None)
    fp = tokenizer_fingerprint(tokenizer) if cache_dir else ""
    rows, content, name = read_source(cfg.train_file, records, "train_file")
    fmt, train_tok = _prepare_source(rows, content, name, tokenizer, cfg, cache_dir, fp)
    _check_not_empty(train_tok, name, cfg)
    stats = DataStats(records=train_tok.counts["records"], truncated=train_tok.counts["truncated"],
                      dropped=train_tok.counts["dropped"])
    if cfg.eval_file or eval_records is not None:
        erows, econtent, ename = read_source(cfg.eval_file, eval_records, "eval_file")
        efmt, eval_tok = _prepare_source(erows, econtent, ename, tokenizer, cfg, cache_dir, fp)
        _check_not_empty(eval_tok, ename, cfg)
        if _paired(efmt) != _paired(fmt):
            raise DataError(f"{ename}: {efmt} records, but {name} holds {fmt} records; preference (chosen/rejected) "
                            "data must be in both files or in neither")
        train, evals = train_tok.examples, eval_tok.examples
        for key in ("records", "truncated", "dropped"):
            setattr(stats, key, getattr(stats, key) + eval_tok.counts[key])
    else:
        train, evals = _split(train_tok, name, cfg.eval_fraction, seed)
    _fill_stats(stats, train)
    if _paired(fmt):
        train, evals = as_pairs(train), as_pairs(evals)
        stats.examples = len(train)
    stats.eval_examples = len(evals)
    _log_stats(stats, cfg)
    return train, evals, stats
