"""Preference records -> ``PreferenceExample``: a chosen and a rejected response to one prompt, each tokenized
and masked exactly as an SFT example (only the responses carry labels).

A record is ``prompt`` + ``chosen`` + ``rejected``. Each may be a string or a list of messages:

- strings: rendered as prompt_completion renders them (a user turn and an assistant reply under a chat template,
  plain text otherwise, ``data.system_prompt`` first);
- ``prompt`` as messages, ``chosen``/``rejected`` as strings (one assistant turn each) or message lists;
- no ``prompt``: ``chosen`` and ``rejected`` are whole conversations; their shared leading messages are the prompt.

``data.train_on_prompt`` does not apply: a preference objective compares the responses only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qlora_kit.config import DataConfig
from qlora_kit.data import DataError
from qlora_kit.data.formats import FORMATS, read_fields, shared_prefix
from qlora_kit.data.sources import Row
from qlora_kit.data.tokenize import Example, TokenizedSource, n_supervised, to_text, tokenize_text, truncate


@dataclass
class PreferenceExample:
    """The two tokenized sides of a preference record; they share the prompt tokens."""

    chosen: Example  # prompt + preferred response, labels on the response only
    rejected: Example  # prompt + dispreferred response, labels on the response only


def n_tokens(example: Example | PreferenceExample) -> int:
    """Tokens of an example, or of both sides of a pair (what batching groups by and the token counts add)."""
    if isinstance(example, PreferenceExample):
        return len(example.chosen.input_ids) + len(example.rejected.input_ids)
    return len(example.input_ids)


def longest_row(example: Example | PreferenceExample) -> int:
    """Tokens of the longest row the example puts into a batch: itself, or the longer side of a pair (a pair is
    two rows of a batch: ``collate_pairs``)."""
    if isinstance(example, PreferenceExample):
        return max(len(example.chosen.input_ids), len(example.rejected.input_ids))
    return len(example.input_ids)


def _is_empty(value: str | list[dict]) -> bool:
    return not value.strip() if isinstance(value, str) else all(not m["content"].strip() for m in value)


def _check_sides(fields: dict, where: str) -> None:
    """Both responses present, non-empty, of one kind (text or messages) and different."""
    chosen, rejected = fields["chosen"], fields["rejected"]
    for name in ("chosen", "rejected"):
        if _is_empty(fields[name]):
            raise DataError(f'{where}: field "{name}" is empty; a preference pair needs two non-empty responses')
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(f'{where}: "chosen" and "rejected" must both be strings or both be message lists')
    if chosen == rejected:
        raise DataError(f'{where}: "chosen" and "rejected" are identical, so the pair prefers nothing; fix or '
                        "remove the record")


def _check_prompt(fields: dict, where: str) -> None:
    """A prompt, given or as the shared leading messages, and a response with an assistant turn on each side."""
    prompt, chosen, rejected = fields["prompt"], fields["chosen"], fields["rejected"]
    if isinstance(prompt, str) and _is_empty(prompt) and isinstance(chosen, str):
        raise DataError(f'{where}: field "prompt" is missing or empty; string "chosen"/"rejected" need the prompt they answer '
                        "(or give chosen and rejected as conversations that start with the same messages)")
    k = 0
    if isinstance(chosen, list) and not prompt:
        k = shared_prefix(chosen, rejected)
        if k == 0:
            raise DataError(f'{where}: "chosen" and "rejected" share no leading messages, so the prompt is unknown; '
                            'give it as field "prompt" or start both conversations with the same messages')
    for name in ("chosen", "rejected"):
        reply = fields[name][k:] if isinstance(fields[name], list) else [{"role": "assistant"}]
        if not any(m["role"] == "assistant" for m in reply):
            raise DataError(f'{where}: field "{name}" has no assistant turn after the prompt; its response must '
                            "hold at least one assistant message")


def check_pair(fields: dict, tokenizer: Any, where: str) -> None:
    """Raise DataError naming ``where`` for a pair that cannot train: an empty field, chosen equal to rejected,
    mixed string/message responses, no prompt, or a response without an assistant turn. (Every tokenizer has
    a chat template by now: the prompt contract gives template-less ones a named template.)"""
    _check_sides(fields, where)
    _check_prompt(fields, where)


def tokenize_pair(record: dict, tokenizer: Any, cfg: DataConfig, where: str) -> tuple[PreferenceExample, bool]:
    """Check, render and tokenize one preference record, truncated to ``cfg.max_seq_len``.

    Returns the pair and whether either side was cut. Raises DataError (see ``check_pair``), and also when
    truncation removes every response token of a side (the prompt fills ``max_seq_len``) or leaves both
    sides identical.
    """
    fields = read_fields(record, "preference", tokenizer, where)
    check_pair(fields, tokenizer, where)
    pair = FORMATS["preference"].render(fields, tokenizer, cfg)
    sides, cut = [], False
    for name, side in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        full = tokenize_text(to_text(side, tokenizer, where), tokenizer)
        ex, was_cut = truncate(full, cfg.max_seq_len)
        if n_supervised(ex.labels) == 0:
            raise DataError(f'{where}: the prompt fills data.max_seq_len={cfg.max_seq_len} tokens, so the "{name}" '
                            f"response ({len(full.input_ids)} tokens with the prompt) is truncated away; raise "
                            "data.max_seq_len or shorten the prompt")
        sides.append(ex)
        cut = cut or was_cut
    if sides[0].input_ids == sides[1].input_ids:
        raise DataError(f'{where}: "chosen" and "rejected" differ only after data.max_seq_len={cfg.max_seq_len} '
                        "tokens, so the truncated pair prefers nothing; raise data.max_seq_len")
    return PreferenceExample(*sides), cut


def tokenize_pairs(rows: list[Row], fmt: str, tokenizer: Any, cfg: DataConfig) -> TokenizedSource:
    """Every record of a preference source as two examples in a row (chosen, rejected), both with the record's
    index, so the token cache and the validation split treat a pair as one unit (``as_pairs`` regroups them).
    Raises DataError at the first bad record."""
    out = TokenizedSource([], [], {"records": len(rows), "truncated": 0, "dropped": 0})
    for i, (where, record) in enumerate(rows):
        pair, cut = tokenize_pair(record, tokenizer, cfg, where)
        out.examples += [pair.chosen, pair.rejected]
        out.record_index += [i, i]
        out.counts["truncated"] += cut
    return out


def as_pairs(examples: list[Example]) -> list[PreferenceExample]:
    """``tokenize_pairs``' flat (chosen, rejected, chosen, rejected, ...) list as pairs."""
    if len(examples) % 2:
        raise ValueError(f"{len(examples)} examples cannot be (chosen, rejected) pairs")
    return [PreferenceExample(c, r) for c, r in zip(examples[0::2], examples[1::2])]
