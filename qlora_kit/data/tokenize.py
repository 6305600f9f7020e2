"""Rendered record -> text -> token ids -> labels masked on the prompt; one source's records -> examples."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qlora_kit.config import DataConfig
from qlora_kit.data import IGNORE_INDEX, DataError
from qlora_kit.data.contract import prompt_contract
from qlora_kit.data.formats import Chat, Rendered, render
from qlora_kit.data.sources import Row


@dataclass
class Example:
    """One tokenized training example."""

    input_ids: list[int]
    labels: list[int]  # input_ids where supervised, IGNORE_INDEX elsewhere


def n_supervised(labels: list[int]) -> int:
    """How many positions of an example are next-token targets (``labels[1:]`` not IGNORE_INDEX)."""
    return sum(1 for y in labels[1:] if y != IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------
# Rendered record -> text + supervised character spans


@dataclass
class Text:
    """A rendered record as one string and the character ranges trained on."""

    text: str  # the whole example as the model reads it
    spans: list[tuple[int, int]]  # [start, end) character ranges of the responses
    templated: bool  # written by the chat template, which writes its own special tokens
    ends_with_reply: bool  # the last span is the example's final reply, so it ends with a supervised EOS


def _apply_template(tokenizer: Any, messages: list[dict], where: str, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja raises TemplateError for e.g. an unsupported system role
        raise DataError(f"{where}: the tokenizer's chat template rejected the messages ({e})") from None


def _chat_spans(tokenizer: Any, messages: list[dict], where: str, trained_from: int = 0
                ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn from ``trained_from`` on.

    Each turn's span runs from the end of the prefix rendered with the generation prompt to the end of the
    prefix that includes the turn, so it covers the reply and the template's end-of-turn text.
    """
    full = _apply_template(tokenizer, messages, where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < trained_from:
            continue
        start = _apply_template(tokenizer, messages[:i], where, generation_prompt=True)
        end = _apply_template(tokenizer, messages[: i + 1], where)
        if not (full.startswith(start) and full.startswith(end) and len(start) <= len(end)):
            raise DataError(f"{where}: the chat template does not render the conversation prefix by prefix, so "
                            "assistant turns cannot be located; set data.train_on_prompt=true or use a template "
                            "whose output for the first k messages is a prefix of the whole")
        spans.append((len(start), len(end)))
    return full, spans


def to_text(rendered: Rendered, tokenizer: Any, where: str) -> Text:
    """A ``Chat`` through the tokenizer's chat template, or a ``Plain`` text, as ``Text``.

    Raises DataError when the template rejects the messages or is not prefix-stable.
    """
    if isinstance(rendered, Chat):
        text, spans = _chat_spans(tokenizer, rendered.messages, where, rendered.trained_from)
        return Text(text, spans, True, rendered.messages[-1]["role"] == "assistant")
    return Text(rendered.text, [(0, len(rendered.text))], False, True)


# ---------------------------------------------------------------------------------------------
# Tokenization and masking


def _token_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]], add_special: bool
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
    """Labels: ids inside a span, IGNORE_INDEX outside; tokens after a span's last EOS stay unsupervised."""
    labels = [IGNORE_INDEX] * len(ids)
    for lo, hi in token_spans:
        eos_at = [i for i in range(lo, hi) if ids[i] == eos_id]
        for i in range(lo, eos_at[-1] + 1 if eos_at else hi):
            labels[i] = ids[i]
    return labels


def tokenize_example(record: dict, fmt: str, tokenizer: Any, cfg: DataConfig, where: str) -> Example:
    """Tokenize one record and mask its labels; the result may be longer than ``cfg.max_seq_len``.

    The record is rendered by the tokenizer's prompt contract (``data.contract.prompt_contract``, decided on
    first use). Responses (every assistant turn) are supervised, prompts, system and user text get
    IGNORE_INDEX (``cfg.train_on_prompt`` supervises everything). The reply ends with a supervised EOS: the
    template's end-of-turn token when it is the EOS, else an appended EOS. Raises DataError for a malformed
    record or an unknown ``cfg.chat_template``.
    """
    prompt_contract(tokenizer, cfg)
    return tokenize_text(to_text(render(record, fmt, tokenizer, cfg, where), tokenizer, where), tokenizer,
                         cfg.train_on_prompt)


def tokenize_text(r: Text, tokenizer: Any, train_on_prompt: bool = False) -> Example:
    """Token ids of ``r.text`` with labels on its spans (everything when ``train_on_prompt``); a final reply
    that lacks the EOS gets one appended, supervised."""
    eos = tokenizer.eos_token_id
    ids, token_spans = _token_spans(tokenizer, r.text, r.spans, add_special=not r.templated)
    labels = _mask(ids, token_spans, eos)
    if eos is not None and r.ends_with_reply and eos not in ids[slice(*token_spans[-1])]:
        ids, labels = ids + [eos], labels + [eos]
    if train_on_prompt:
        labels = list(ids)
    return Example(input_ids=ids, labels=labels)


# ---------------------------------------------------------------------------------------------
# One source's records -> examples


@dataclass
class TokenizedSource:
    """The kept examples of one source (file or in-memory records), the record each came from, and the counts."""

    examples: list[Example]  # truncated to max_seq_len, each with a supervised token
    record_index: list[int]  # position of each example's record in the source
    counts: dict = field(default_factory=dict)  # records, truncated, dropped


def truncate(ex: Example, max_len: int) -> tuple[Example, bool]:
    """``ex`` cut to its first ``max_len`` tokens, and whether it was cut."""
    if len(ex.input_ids) <= max_len:
        return ex, False
    return Example(ex.input_ids[:max_len], ex.labels[:max_len]), True


def tokenize_source(rows: list[Row], fmt: str, tokenizer: Any, cfg: DataConfig) -> TokenizedSource:
    """Tokenize every record first-to-last, truncate to ``cfg.max_seq_len`` and drop examples left with no
    supervised token. Raises DataError at the first malformed record."""
    out = TokenizedSource([], [], {"records": len(rows), "truncated": 0, "dropped": 0})
    for i, (where, record) in enumerate(rows):
        ex, cut = truncate(tokenize_example(record, fmt, tokenizer, cfg, where), cfg.max_seq_len)
        out.counts["truncated"] += cut
        if n_supervised(ex.labels) == 0:
            out.counts["dropped"] += 1
            continue
        out.examples.append(ex)
        out.record_index.append(i)
    return out
