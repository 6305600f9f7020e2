"""Training data: records -> prompt/response tokens -> labels masked on the prompt -> batches.

Formats (one per file, detected from the first record unless ``DataConfig.format`` names it):

- ``alpaca``: ``instruction``, optional ``input``, ``output``;
- ``chat``: ``messages``, a list of ``{"role", "content"}``; every assistant turn is trained;
- ``prompt_completion``: ``prompt``, ``completion``;
- ``text``: ``text``, every token trained.

alpaca and prompt/completion records become a user message and an assistant reply rendered with the
tokenizer's chat template (as ``inference.prompts.render_prompt`` renders prompts), or plain text when the tokenizer
has no template. Tokenized files are cached as safetensors keyed by file bytes, tokenizer and settings.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from bisect import bisect_left, insort
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from qlora_kit.atomic import atomic_write_bytes
from qlora_kit.config import DataConfig

log = logging.getLogger("qlora_kit")

from qlora_kit.data import IGNORE_INDEX
CACHE_VERSION = "1"  # bump when tokenization or masking rules change
FORMAT_FIELDS = {  # required fields, optional fields
    "alpaca": (("instruction", "output"), ("input",)),
    "chat": (("messages",), ()),
    "prompt_completion": (("prompt", "completion"), ()),
    "text": (("text",), ()),
}
_DETECT = [("messages", "chat"), ("instruction", "alpaca"), ("prompt", "prompt_completion"),
           ("completion", "prompt_completion"), ("text", "text"), ("output", "alpaca")]


class DataError(ValueError):
    """Bad training data. The message names the file, the line (or record) and the field, and the fix."""


@dataclass
class Example:
    """One tokenized training example."""

    input_ids: list[int]
    labels: list[int]  # input_ids where supervised, -100 elsewhere


@dataclass
class DataStats:
    """Counts over the prepared data (lengths are over training examples)."""

    examples: int = 0  # training examples kept
    eval_examples: int = 0  # validation examples kept
    records: int = 0  # records read, train and eval files together
    truncated: int = 0  # examples cut to max_seq_len
    dropped: int = 0  # examples with no supervised token left (empty, or prompt filled max_seq_len)
    tokens: int = 0  # training tokens (no padding)
    supervised_tokens: int = 0  # training tokens that are loss targets
    len_p50: int = 0
    len_p90: int = 0
    len_p99: int = 0
    len_max: int = 0
    padding_fraction: float | None = None  # padded slots / all slots in the batches (set by make_batches)

    def as_dict(self) -> dict:
        """A JSON-safe dict (for metrics and summaries)."""
        return asdict(self)


def n_supervised(labels: list[int]) -> int:
    """How many positions of an example are next-token targets (``labels[1:]`` not -100)."""
    return sum(1 for y in labels[1:] if y != IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------
# Reading files


def load_records(path: str | Path) -> list[dict]:
    """Read the records of a .jsonl, .json, .csv or .parquet file as dicts.

    Raises DataError naming the file and line for a missing file, malformed JSON or a non-object record.
    """
    return [record for _, record in _read_records(Path(path))]


def _read_records(path: Path) -> list[tuple[str, dict]]:
    """``(where, record)`` pairs; ``where`` is e.g. ``data/train.jsonl line 17`` (1-based)."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found (set data.train_file / data.eval_file to an existing file)")
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise DataError(f"{path}: unknown file type {suffix!r}; use .jsonl, .json, .csv or .parquet")
    try:
        return readers[suffix](path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); "
                        "save the file as UTF-8") from None


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object with the record's fields, got {type(value).__name__}")
    return value


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (column {e.start + 1} holds byte "
                                f"{raw[e.start:e.start + 1]!r}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); each line must be one "
                                "complete JSON object") from None
            out.append((where, _object(value, where)))
    return out


def _read_json(path: Path) -> list[tuple[str, dict]]:
    text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and "\n" in text.strip():
            return _read_jsonl(path)  # JSON Lines saved as .json
        raise DataError(f"{path} line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of records (or JSON Lines), got {type(value).__name__}")
    return [(f"{path} record {i}", _object(v, f"{path} record {i}")) for i, v in enumerate(value, 1)]


def _read_csv(path: Path) -> list[tuple[str, dict]]:
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        start = reader.line_num + 1
        for row in reader:
            out.append((f"{path} line {start}", {k: v for k, v in row.items() if k is not None}))
            start = reader.line_num + 1
    return out


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: cannot read Parquet ({e})") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(rows, 1)]


def _in_memory(records: Iterable[dict], name: str) -> list[tuple[str, dict]]:
    """``(where, record)`` pairs for a ``datasets.Dataset`` or a list of dicts."""
    if hasattr(records, "to_list"):
        records = records.to_list()
    return [(f"{name} record {i}", _object(r, f"{name} record {i}")) for i, r in enumerate(records, 1)]


# ---------------------------------------------------------------------------------------------
# Formats


def detect_format(record: dict, where: str) -> str:
    """The record format from the fields present: alpaca, chat, prompt_completion or text.

    Raises DataError listing the fields found and the ones each format needs.
    """
    for key, fmt in _DETECT:
        if key in record:
            return fmt
    needs = "; ".join(f"{fmt}: {', '.join(req)}" for fmt, (req, _) in FORMAT_FIELDS.items())
    raise DataError(f"{where}: cannot tell the record format from fields {sorted(record)} "
                    f"(needs {needs}); rename the fields or set data.format")


def _string_field(record: dict, name: str, fmt: str, where: str, required: bool = True) -> str:
    value = record.get(name)
    if value is None:
        if required:
            need = ", ".join(FORMAT_FIELDS[fmt][0])
            raise DataError(f'{where}: missing field "{name}" ({fmt} format needs {need})')
        return ""
    if not isinstance(value, str):
        raise DataError(f'{where}: field "{name}" must be a string, got {type(value).__name__} {value!r:.40} '
                        "(quote the value)")
    return _utf8(value, name, where)


def _utf8(value: str, name: str, where: str) -> str:
    """``value``, if it is encodable text (JSON can smuggle in lone UTF-16 surrogates like \\ud800)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f'{where}: field "{name}" holds an unpaired surrogate {value[e.start]!r} at character '
                        f"{e.start} (a broken \\u escape); fix the text's encoding") from None
    return value


def chat_roles(tokenizer) -> tuple[str, ...]:
    """Roles chat records may use: system, user, assistant, and tool when the chat template mentions tools."""
    return ("system", "user", "assistant") + (("tool",) if "tool" in str(tokenizer.chat_template) else ())


def _messages(record: dict, where: str, roles: tuple[str, ...]) -> list[dict]:
    msgs = record.get("messages")
    if msgs is None:
        raise DataError(f'{where}: missing field "messages" (chat format needs messages)')
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f'{where}: field "messages" must be a non-empty list of {{"role", "content"}} objects')
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f'{where}: field "messages[{i}]" must be an object with "role" and "content"')
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "missing" if m.get(key) is None else f"a {type(m[key]).__name__}"
                raise DataError(f'{where}: field "messages[{i}].{key}" must be a string, got {got}')
        if m["role"] not in roles:
            raise DataError(f'{where}: field "messages[{i}].role" is {m["role"][:40]!r}, not a role this chat template '
                            f"knows; use one of {', '.join(roles)}")
        out.append({key: _utf8(m[key], f"messages[{i}].{key}", where) for key in ("role", "content")})
    return out


def _record_messages(record: dict, fmt: str, cfg: DataConfig, where: str) -> list[dict]:
    """alpaca / prompt_completion as a user message (plus optional system message) and an assistant reply."""
    if fmt == "alpaca":
        prompt = _string_field(record, "instruction", fmt, where)
        extra = _string_field(record, "input", fmt, where, required=False)
        prompt = f"{prompt}\n\n{extra}" if extra else prompt
        reply = _string_field(record, "output", fmt, where)
    else:
        prompt = _string_field(record, "prompt", fmt, where)
        reply = _string_field(record, "completion", fmt, where)
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return system + [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


# ---------------------------------------------------------------------------------------------
# Rendering to text + supervised character spans


def _render_chat(tokenizer, messages: list[dict], where: str, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja raises TemplateError for e.g. an unsupported system role
        raise DataError(f"{where}: the tokenizer's chat template rejected the messages ({e})") from None


def _chat_spans(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn.

    Each turn's span runs from the end of the prefix rendered with the generation prompt to the end of the
    prefix that includes the turn, so it covers the reply and the template's end-of-turn text.
    """
    full = _render_chat(tokenizer, messages, where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _render_chat(tokenizer, messages[:i], where, generation_prompt=True)
        end = _render_chat(tokenizer, messages[: i + 1], where)
        if not (full.startswith(start) and full.startswith(end) and len(start) <= len(end)):
            raise DataError(f"{where}: the chat template does not render the conversation prefix by prefix, so "
                            "assistant turns cannot be located; set data.train_on_prompt=true or use a template "
                            "whose output for the first k messages is a prefix of the whole")
        spans.append((len(start), len(end)))
    return full, spans


def _plain(record: dict, fmt: str, cfg: DataConfig, where: str) -> tuple[str, str]:
    """(prompt, response) text for a tokenizer without a chat template."""
    system = f"{cfg.system_prompt}\n\n" if cfg.system_prompt else ""
    if fmt == "alpaca":
        extra = _string_field(record, "input", fmt, where, required=False)
        prompt = (f"{system}### Instruction:\n{_string_field(record, 'instruction', fmt, where)}\n\n"
                  + (f"### Input:\n{extra}\n\n" if extra else "") + "### Response:\n")
        return prompt, _string_field(record, "output", fmt, where)
    return system + _string_field(record, "prompt", fmt, where), _string_field(record, "completion", fmt, where)


def render_record(record: dict, fmt: str, tokenizer, cfg: DataConfig,
                  where: str) -> tuple[str, list[tuple[int, int]], bool]:
    """``(text, supervised character spans, templated)`` for one record; validates its fields."""
    if fmt not in FORMAT_FIELDS:
        raise DataError(f"{where}: unknown format {fmt!r}; use alpaca, chat, prompt_completion or text")
    if fmt == "text":
        text = _string_field(record, "text", fmt, where)
        return text, [(0, len(text))], False
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if fmt == "chat" and not has_template:
        raise DataError(f"{where}: chat records need a tokenizer with a chat template, and this one has none; "
                        "convert the data to prompt_completion or use an instruct model's tokenizer")
    if fmt == "chat" or has_template:
        msgs = (_messages(record, where, chat_roles(tokenizer)) if fmt == "chat"
                else _record_messages(record, fmt, cfg, where))
        text, spans = _chat_spans(tokenizer, msgs, where)
        return text, spans, True
    prompt, response = _plain(record, fmt, cfg, where)
    return prompt + response, [(len(prompt), len(prompt) + len(response))], False


# ---------------------------------------------------------------------------------------------
# Tokenization and masking


def _token_spans(tokenizer, text: str, spans: list[tuple[int, int]], add_special: bool
                 ) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` and each character span as a ``[start, end)`` range of token positions.

    A token belongs to a span when its last character does. Tokenizers without offsets (slow ones) fall back
    to counting the tokens of the text up to each span boundary.
    """
    try:
        enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    except NotImplementedError:
        ids = list(tokenizer(text, add_special_tokens=add_special)["input_ids"])
        count = lambda c: len(tokenizer(text[:c], add_special_tokens=add_special)["input_ids"])  # noqa: E731
        return ids, [(count(lo), min(count(hi), len(ids))) for lo, hi in spans]
    chars = [e - 1 if e > s else s for s, e in enc["offset_mapping"]]  # a character of each token
    out = []
    for lo, hi in spans:
        inside = [i for i, c in enumerate(chars) if lo <= c < hi]
        out.append((inside[0], inside[-1] + 1) if inside else (0, 0))
    return list(enc["input_ids"]), out


def _mask(ids: list[int], token_spans: list[tuple[int, int]], eos_id: int | None) -> list[int]:
    """Labels: ids inside a span, -100 outside; tokens after a span's last EOS stay unsupervised."""
    labels = [IGNORE_INDEX] * len(ids)
    for lo, hi in token_spans:
        eos_at = [i for i in range(lo, hi) if ids[i] == eos_id]
        for i in range(lo, eos_at[-1] + 1 if eos_at else hi):
            labels[i] = ids[i]
    return labels


def tokenize_example(record: dict, fmt: str, tokenizer, cfg: DataConfig, where: str) -> Example:
    """Tokenize one record and mask its labels; the result may be longer than ``cfg.max_seq_len``.

    Responses (every assistant turn) are supervised, prompts, system and user text get -100
    (``cfg.train_on_prompt`` supervises everything). The reply ends with a supervised EOS: the template's
    end-of-turn token when it is the EOS, else an appended EOS. Raises DataError for a malformed record.
    """
    text, spans, templated = render_record(record, fmt, tokenizer, cfg, where)
    eos = tokenizer.eos_token_id
    ids, token_spans = _token_spans(tokenizer, text, spans, add_special=not templated)
    labels = _mask(ids, token_spans, eos)
    last_is_reply = bool(spans) and (fmt != "chat" or record["messages"][-1].get("role") == "assistant")
    if eos is not None and last_is_reply and eos not in ids[slice(*token_spans[-1])]:
        ids, labels = ids + [eos], labels + [eos]
    if cfg.train_on_prompt:
        labels = list(ids)
    return Example(input_ids=ids, labels=labels)


def _truncate(ex: Example, max_len: int) -> tuple[Example, bool]:
    if len(ex.input_ids) <= max_len:
        return ex, False
    return Example(ex.input_ids[:max_len], ex.labels[:max_len]), True


# ---------------------------------------------------------------------------------------------
# One source (file or in-memory records) -> examples, cached


@dataclass
class _Tokenized:
    """The kept examples of one source, the record each came from, and the counts."""

    examples: list[Example]
    record_index: list[int]
    counts: dict = field(default_factory=dict)  # records, truncated, dropped


def _tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    for part in (type(tokenizer).__name__, vocab, str(getattr(tokenizer, "chat_template", None)),
                 str(tokenizer.eos_token_id), str(tokenizer.bos_token_id)):
        h.update(part.encode("utf-8") + b"\0")
    return h.hexdigest()


def _cache_key(content: bytes, tokenizer_fp: str, cfg: DataConfig, fmt: str) -> str:
    settings = {"v": CACHE_VERSION, "format": fmt, "max_seq_len": cfg.max_seq_len,
                "train_on_prompt": cfg.train_on_prompt, "system_prompt": cfg.system_prompt}
    h = hashlib.sha256(content)
    h.update(tokenizer_fp.encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:40]


def _save_cache(path: Path, tok: _Tokenized) -> None:
    from safetensors.numpy import save

    lengths = [len(e.input_ids) for e in tok.examples]
    tensors = {
        "input_ids": np.asarray([t for e in tok.examples for t in e.input_ids], dtype=np.int32),
        "supervised": np.asarray([y != IGNORE_INDEX for e in tok.examples for y in e.labels], dtype=np.uint8),
        "offsets": np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),
        "record_index": np.asarray(tok.record_index, dtype=np.int64),
    }
    atomic_write_bytes(path, save(tensors, metadata={"counts": json.dumps(tok.counts)}))


def _load_cache(path: Path) -> _Tokenized | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            counts = json.loads(f.metadata()["counts"])
            ids, sup, off, rec = (f.get_tensor(k) for k in ("input_ids", "supervised", "offsets", "record_index"))
    except Exception as e:  # a damaged cache is only a lost shortcut
        log.warning("token cache %s is unreadable (%s); tokenizing again", path, e)
        return None
    labels = np.where(sup.astype(bool), ids, IGNORE_INDEX)
    examples = [Example(ids[a:b].tolist(), labels[a:b].tolist()) for a, b in zip(off[:-1], off[1:])]
    return _Tokenized(examples, rec.tolist(), counts)


def _tokenize_all(rows: list[tuple[str, dict]], fmt: str, tokenizer, cfg: DataConfig) -> _Tokenized:
    """Tokenize, truncate and drop; every record is validated first-to-last."""
    out = _Tokenized([], [], {"records": len(rows), "truncated": 0, "dropped": 0})
    for i, (where, record) in enumerate(rows):
        ex, cut = _truncate(tokenize_example(record, fmt, tokenizer, cfg, where), cfg.max_seq_len)
        out.counts["truncated"] += cut
        if n_supervised(ex.labels) == 0:
            out.counts["dropped"] += 1
            continue
        out.examples.append(ex)
        out.record_index.append(i)
    return out


def _source_format(rows: list[tuple[str, dict]], cfg: DataConfig, name: str) -> str:
    if not rows:
        raise DataError(f"{name}: no records (the data is empty); add training records")
    return cfg.format if cfg.format != "auto" else detect_format(rows[0][1], rows[0][0])


def _prepare_source(rows: list[tuple[str, dict]], content: bytes, name: str, tokenizer, cfg: DataConfig,
                    cache_dir: Path | None, tokenizer_fp: str) -> _Tokenized:
    """Tokenize one source, through the cache when ``cache_dir`` is set."""
    fmt = _source_format(rows, cfg, name)
    cache = cache_dir / f"{_cache_key(content, tokenizer_fp, cfg, fmt)}.safetensors" if cache_dir else None
    if cache is not None and cache.is_file():
        hit = _load_cache(cache)
        if hit is not None:
            log.info("%s: %d tokenized examples from cache %s", name, len(hit.examples), cache)
            return hit
    tok = _tokenize_all(rows, fmt, tokenizer, cfg)
    if cache is not None and tok.examples:
        _save_cache(cache, tok)
    return tok


def _check_not_empty(tok: _Tokenized, name: str, cfg: DataConfig) -> None:
    c = tok.counts
    if tok.examples:
        return
    if c["truncated"]:
        raise DataError(f"{name}: all {c['records']} examples were dropped: {c['truncated']} were longer than "
                        f"data.max_seq_len={cfg.max_seq_len} and lost every response token to truncation; raise "
                        "data.max_seq_len or shorten the prompts")
    raise DataError(f"{name}: all {c['records']} examples were dropped: none has a response token to train on "
                    "(empty responses, or chat without assistant turns); fix the data or set data.train_on_prompt")


# ---------------------------------------------------------------------------------------------
# prepare_data


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


def _source(path: str, records: Any, name: str) -> tuple[list[tuple[str, dict]], bytes, str]:
    """Rows, the bytes that key the cache, and a display name for a file or in-memory records."""
    if records is not None:
        rows = _in_memory(records, name)
        return rows, json.dumps([r for _, r in rows], sort_keys=True, default=str).encode(), name
    if not path:
        raise DataError(f"data.{name}: no file given; set data.{name} to a JSONL, JSON, CSV or Parquet file")
    p = Path(path)
    rows = _read_records(p)
    return rows, p.read_bytes(), str(p)


def _fill_stats(stats: DataStats, train: list[Example]) -> None:
    lengths = np.asarray(sorted(len(e.input_ids) for e in train))
    stats.examples, stats.tokens = len(train), int(lengths.sum())
    stats.supervised_tokens = sum(n_supervised(e.labels) for e in train)
    stats.len_p50, stats.len_p90, stats.len_p99 = (int(np.percentile(lengths, q)) for q in (50, 90, 99))
    stats.len_max = int(lengths[-1])


def prepare_data(cfg: DataConfig, tokenizer, cache_dir: Path | None = None, seed: int = 0, *,
                 records: Any = None, eval_records: Any = None) -> tuple[list[Example], list[Example], DataStats]:
    """Read, validate, tokenize, mask and split the data.

    Args:
        cfg: file names, format, max_seq_len, masking and the validation split.
        tokenizer: the model's tokenizer (its chat template renders chat, alpaca and prompt/completion records).
        cache_dir: where tokenized sources are cached (default ``cfg.cache_dir``; neither set: no cache).
        seed: fixes which records ``cfg.eval_fraction`` holds out.
        records / eval_records: a ``datasets.Dataset`` or list of dicts used instead of the files.
    Returns:
        ``(train, eval, stats)``; ``eval`` is empty without eval_file/eval_records and eval_fraction.
    Raises:
        DataError naming file, line and field for malformed records, an empty dataset, or data where every
        example is too long for ``cfg.max_seq_len``.
    """
    cache_dir = Path(cache_dir) if cache_dir else (Path(cfg.cache_dir) if cfg.cache_dir else None)
    fp = _tokenizer_fingerprint(tokenizer) if cache_dir else ""
    rows, content, name = _source(cfg.train_file, records, "train_file")
    train_tok = _prepare_source(rows, content, name, tokenizer, cfg, cache_dir, fp)
    _check_not_empty(train_tok, name, cfg)
    stats = DataStats(records=train_tok.counts["records"], truncated=train_tok.counts["truncated"],
                      dropped=train_tok.counts["dropped"])
    if cfg.eval_file or eval_records is not None:
        erows, econtent, ename = _source(cfg.eval_file, eval_records, "eval_file")
        eval_tok = _prepare_source(erows, econtent, ename, tokenizer, cfg, cache_dir, fp)
        _check_not_empty(eval_tok, ename, cfg)
        train, evals = train_tok.examples, eval_tok.examples
        for key in ("records", "truncated", "dropped"):
            setattr(stats, key, getattr(stats, key) + eval_tok.counts[key])
    else:
        held = _held_out(train_tok.counts["records"], cfg.eval_fraction, seed)
        pairs = list(zip(train_tok.record_index, train_tok.examples))
        train = [e for i, e in pairs if i not in held]
        evals = [e for i, e in pairs if i in held]
        if not train:
            raise DataError(f"{name}: the eval_fraction split left no training example; lower data.eval_fraction")
    _fill_stats(stats, train)
    stats.eval_examples = len(evals)
    if stats.truncated or stats.dropped:
        log.warning("data: %d of %d examples truncated to data.max_seq_len=%d, %d dropped with no supervised "
                    "token left", stats.truncated, stats.records, cfg.max_seq_len, stats.dropped)
    log.info("data: %d train / %d eval examples from %d records; %d truncated to %d tokens, %d dropped "
             "(no supervised token left); %d tokens (%d supervised); length p50/p90/p99/max %d/%d/%d/%d",
             stats.examples, stats.eval_examples, stats.records, stats.truncated, cfg.max_seq_len, stats.dropped,
             stats.tokens, stats.supervised_tokens, stats.len_p50, stats.len_p90, stats.len_p99, stats.len_max)
    return train, evals, stats


# ---------------------------------------------------------------------------------------------
# Batching


def _pack_rows(lengths: list[int], max_len: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of example indices into rows of at most ``max_len`` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, row number)
    for i in order:
        at = bisect_left(free, (lengths[i], -1))
        if at == len(free):
            rows.append([i])
            insort(free, (max_len - lengths[i], len(rows) - 1))
        else:
            cap, r = free.pop(at)
            rows[r].append(i)
            insort(free, (cap - lengths[i], r))
    return rows


def _next_fit(lengths: list[int], max_len: int) -> list[list[int]]:
    """Positions in order, cut into consecutive rows of at most ``max_len`` tokens (collate's packing)."""
    rows: list[list[int]] = []
    used = max_len
    for i, n in enumerate(lengths):
        if n > max_len:
            raise ValueError(f"example of {n} tokens does not fit max_seq_len={max_len}; truncate it first")
        if used + n > max_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def make_batches(examples: list[Example], batch_size: int, cfg: DataConfig, seed: int, epoch: int,
                 stats: DataStats | None = None) -> list[list[int]]:
    """One epoch's micro-batches as lists of indices into ``examples``, fixed by ``(seed, epoch)``.

    - ``cfg.packing``: examples are bin-packed into rows of <= ``cfg.max_seq_len`` tokens; each batch holds
      the members of ``batch_size`` rows, row after row, and ``collate(..., packing=True)`` rebuilds them.
    - ``cfg.group_by_length``: shuffled, then sorted by length inside mega-chunks of ``50 * batch_size``;
      the batches are shuffled again.
    - otherwise a plain shuffle. The last batch may be smaller. ``stats.padding_fraction`` is filled in if given.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    lengths = [len(e.input_ids) for e in examples]
    if cfg.packing:
        rows = _pack_rows(lengths, cfg.max_seq_len)
        rng.shuffle(rows)
        batches = [[i for row in rows[k:k + batch_size] for i in row] for k in range(0, len(rows), batch_size)]
    else:
        order = list(range(len(examples)))
        rng.shuffle(order)
        if cfg.group_by_length:
            mega = 50 * batch_size
            order = [i for k in range(0, len(order), mega)
                     for i in sorted(order[k:k + mega], key=lambda j: -lengths[j])]
        batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
        if cfg.group_by_length:
            rng.shuffle(batches)
    if stats is not None:
        stats.padding_fraction = padding_fraction(examples, batches, cfg.packing, cfg.max_seq_len)
        log.info("epoch %d: %d batches, padding %.1f%%", epoch, len(batches), 100 * stats.padding_fraction)
    return batches


def padding_fraction(examples: list[Example], batches: list[list[int]], packing: bool, max_seq_len: int) -> float:
    """Padded slots / all slots of the tensors ``collate`` would build for ``batches``."""
    real = slots = 0
    for batch in batches:
        lengths = [len(examples[i].input_ids) for i in batch]
        rows = [sum(lengths[j] for j in r) for r in _next_fit(lengths, max_seq_len)] if packing else lengths
        real += sum(rows)
        slots += len(rows) * max(rows, default=0)
    return 1.0 - real / slots if slots else 0.0


def collate(examples: list[Example], pad_id: int, packing: bool, max_seq_len: int) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch, right-padded to its longest row.

    Not packed: ``input_ids``, ``labels`` (-100 on padding), ``attention_mask``, all ``[b, s]``.
    Packed: examples are laid in order into rows of <= ``max_seq_len`` tokens; returns ``input_ids``, ``labels``
    and ``position_ids`` (restarting at 0 for every example and for the padding tail) and NO attention_mask:
    with position_ids and no mask, transformers confines attention to each packed example. The first label of
    every example is -100 so no example's last token is trained to predict the next example's start.
    """
    lengths = [len(e.input_ids) for e in examples]
    rows = _next_fit(lengths, max_seq_len) if packing else [[i] for i in range(len(examples))]
    width = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [b, s]
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # [b, s]
    positions = torch.zeros((len(rows), width), dtype=torch.long)  # [b, s]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [b, s]
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            ids[r, at:at + n] = torch.tensor(examples[i].input_ids)
            labels[r, at + 1:at + n] = torch.tensor(examples[i].labels[1:], dtype=torch.long)
            positions[r, at:at + n] = torch.arange(n)
            mask[r, at:at + n] = 1
            at += n
        positions[r, at:] = torch.arange(width - at)  # padding: a segment of its own
    if packing:
        return {"input_ids": ids, "labels": labels, "position_ids": positions}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
