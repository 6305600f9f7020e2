"""Record formats. ONE table, ``FORMATS``, drives detection, field checks and rendering.

- ``alpaca``: ``instruction``, optional ``input``, ``output``;
- ``chat``: ``messages``, a list of ``{"role", "content"}``; every assistant turn is trained;
- ``prompt_completion``: ``prompt``, ``completion``;
- ``text``: ``text``, every token trained;
- ``preference``: ``chosen`` and ``rejected`` (strings or message lists) after an optional ``prompt`` (string or
  messages); it renders to a ``Pair`` of two conversations and trains with ``training.objective: dpo | orpo``
  (``data.preference`` checks and tokenizes the pair).

A format's render function turns its checked fields into a ``Chat`` (messages for the chat template) or a
``Plain`` text (the text format); ``tokenize`` turns either into tokens and masks. alpaca and
prompt/completion records become a user message and an assistant reply, rendered by the prompt contract's
chat template (``data.contract``: the tokenizer's own, or a named one for tokenizers without), as
``inference.generate.render_prompt`` renders prompts; the contract's template adds ``data.system_prompt``.

Adding a format: write its ``render_<name>`` function and add one ``FORMATS`` entry, both here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qlora_kit.config import DataConfig
from qlora_kit.data import DataError


@dataclass(frozen=True)
class Chat:
    """A conversation rendered by the tokenizer's chat template; every assistant turn is trained."""

    messages: list[dict]  # {"role", "content"} dicts in order, at least one
    trained_from: int = 0  # assistant turns before this message index are context, not trained (preference prompts)


@dataclass(frozen=True)
class Plain:
    """Plain text, no chat template (the text format): every token is trained, and an EOS follows."""

    text: str  # the text the model learns to write


Rendered = Chat | Plain


@dataclass(frozen=True)
class Pair:
    """A preference record: the same prompt with a chosen and a rejected response; only the responses train."""

    chosen: Rendered  # prompt + the preferred response
    rejected: Rendered  # prompt + the dispreferred response


# ---------------------------------------------------------------------------------------------
# Field checks


def utf8(value: str, name: str, where: str) -> str:
    """``value``, if it is encodable text (JSON can smuggle in lone UTF-16 surrogates like \\ud800)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f'{where}: field "{name}" holds an unpaired surrogate {value[e.start]!r} at character '
                        f"{e.start} (a broken \\u escape); fix the text's encoding") from None
    return value


def read_text(value: Any, name: str, where: str, tokenizer: Any) -> str:
    """A string field's value; raises DataError for another type or unencodable text."""
    if not isinstance(value, str):
        raise DataError(f'{where}: field "{name}" must be a string, got {type(value).__name__} {value!r:.40} '
                        "(quote the value)")
    return utf8(value, name, where)


def chat_roles(tokenizer: Any) -> tuple[str, ...]:
    """Roles chat records may use: system, user, assistant, and tool when the chat template mentions tools."""
    return ("system", "user", "assistant") + (("tool",) if "tool" in str(tokenizer.chat_template) else ())


def read_messages(value: Any, name: str, where: str, tokenizer: Any) -> list[dict]:
    """A non-empty list of ``{"role", "content"}`` strings with roles the chat template knows; raises DataError."""
    if not isinstance(value, list) or not value:
        raise DataError(f'{where}: field "{name}" must be a non-empty list of {{"role", "content"}} objects')
    roles = chat_roles(tokenizer)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f'{where}: field "{name}[{i}]" must be an object with "role" and "content"')
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "missing" if m.get(key) is None else f"a {type(m[key]).__name__}"
                raise DataError(f'{where}: field "{name}[{i}].{key}" must be a string, got {got}')
        if m["role"] not in roles:
            raise DataError(f'{where}: field "{name}[{i}].role" is {m["role"][:40]!r}, not a role this chat template '
                            f"knows; use one of {', '.join(roles)}")
        out.append({key: utf8(m[key], f"{name}[{i}].{key}", where) for key in ("role", "content")})
    return out


def read_text_or_messages(value: Any, name: str, where: str, tokenizer: Any) -> str | list[dict]:
    """A string, or a list of messages (``read_messages``); raises DataError for anything else."""
    if isinstance(value, list):
        return read_messages(value, name, where, tokenizer)
    return read_text(value, name, where, tokenizer)


# ---------------------------------------------------------------------------------------------
# Render functions: checked fields, tokenizer, options -> Chat or Plain


def _user_turn(prompt: str, reply: str) -> Chat:
    """A user message and an assistant reply (the contract's template adds the system prompt)."""
    return Chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}])


def render_alpaca(fields: dict, tokenizer: Any, cfg: DataConfig) -> Rendered:
    """instruction (+ "\\n\\n" + input) as the user turn and output as the reply."""
    instruction, extra = fields["instruction"], fields["input"]
    return _user_turn(f"{instruction}\n\n{extra}" if extra else instruction, fields["output"])


def render_chat(fields: dict, tokenizer: Any, cfg: DataConfig) -> Rendered:
    """The messages as they are (the contract's template adds the system prompt where there is none)."""
    return Chat(fields["messages"])


def render_prompt_completion(fields: dict, tokenizer: Any, cfg: DataConfig) -> Rendered:
    """prompt as the user turn and completion as the reply."""
    return _user_turn(fields["prompt"], fields["completion"])


def render_text(fields: dict, tokenizer: Any, cfg: DataConfig) -> Rendered:
    """The text as it is, every token trained (no chat template, no system prompt)."""
    return Plain(fields["text"])


def shared_prefix(a: list[dict], b: list[dict]) -> int:
    """How many leading messages two conversations have in common."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _preference_side(prompt: str | list[dict], response: str | list[dict], tokenizer: Any,
                     cfg: DataConfig) -> Rendered:
    """One side of a pair: a string prompt and reply as prompt_completion renders them, or the prompt's messages
    (a string prompt as a user turn) followed by the response (a string as one assistant turn)."""
    if isinstance(prompt, str) and isinstance(response, str):
        return render_prompt_completion({"prompt": prompt, "completion": response}, tokenizer, cfg)
    context = prompt if isinstance(prompt, list) else _user_turn(prompt, "").messages[:-1]
    reply = response if isinstance(response, list) else [{"role": "assistant", "content": response}]
    return Chat(context + reply, trained_from=len(context))


def render_preference(fields: dict, tokenizer: Any, cfg: DataConfig) -> Pair:
    """Both sides of a preference record. Without a prompt, chosen and rejected are conversations whose shared
    leading messages are the prompt (``data.preference.check_pair`` has checked that they share some)."""
    prompt, chosen, rejected = fields["prompt"], fields["chosen"], fields["rejected"]
    if not prompt:
        k = shared_prefix(chosen, rejected)
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    return Pair(_preference_side(prompt, chosen, tokenizer, cfg), _preference_side(prompt, rejected, tokenizer, cfg))


# ---------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Field:
    """One field of a record format."""

    name: str  # the record's key
    read: Callable[[Any, str, str, Any], Any]  # (value, name, where, tokenizer) -> checked value; raises DataError
    required: bool = True  # a missing optional field reads as ""


@dataclass(frozen=True)
class Format:
    """A record format: its fields, how it is recognised and how it renders."""

    fields: tuple[Field, ...]  # checked in this order
    detect: dict[str, int]  # keys that identify the format -> rank; across formats the lowest present rank wins
    render: Callable[[dict, Any, DataConfig], Rendered | Pair]  # (checked fields, tokenizer, options) -> Chat/Plain/Pair
    paired: bool = False  # renders to a Pair (chosen vs rejected): tokenized by data.preference, trained by dpo/orpo

    @property
    def required(self) -> tuple[str, ...]:
        """Names of the fields every record must have."""
        return tuple(f.name for f in self.fields if f.required)


FORMATS: dict[str, Format] = {
    "alpaca": Format((Field("instruction", read_text), Field("input", read_text, required=False),
                      Field("output", read_text)), {"instruction": 1, "output": 5}, render_alpaca),
    "chat": Format((Field("messages", read_messages),), {"messages": 0}, render_chat),
    "prompt_completion": Format((Field("prompt", read_text), Field("completion", read_text)),
                                {"prompt": 2, "completion": 3}, render_prompt_completion),
    "text": Format((Field("text", read_text),), {"text": 4}, render_text),
    "preference": Format((Field("prompt", read_text_or_messages, required=False),
                          Field("chosen", read_text_or_messages), Field("rejected", read_text_or_messages)),
                         {"chosen": -1, "rejected": -1}, render_preference, paired=True),
}


def format_names() -> str:
    """The known formats for messages: ``alpaca, chat, prompt_completion, text or preference``."""
    names = list(FORMATS)
    return f"{', '.join(names[:-1])} or {names[-1]}"


def detect_format(record: dict, where: str) -> str:
    """The record format from the fields present (the lowest ``Format.detect`` rank among them).

    Raises DataError listing the fields found and the ones each format needs.
    """
    found = [(rank, name) for name, fmt in FORMATS.items() for key, rank in fmt.detect.items() if key in record]
    if found:
        return min(found)[1]
    needs = "; ".join(f"{name}: {', '.join(fmt.required)}" for name, fmt in FORMATS.items())
    raise DataError(f"{where}: cannot tell the record format from fields {sorted(record)} "
                    f"(needs {needs}); rename the fields or set data.format")


def read_fields(record: dict, name: str, tokenizer: Any, where: str) -> dict:
    """The checked fields of a ``name``-format record (a missing optional field is ""); raises DataError."""
    fmt = FORMATS[name]
    out = {}
    for f in fmt.fields:
        value = record.get(f.name)
        if value is None:
            if f.required:
                raise DataError(f'{where}: missing field "{f.name}" ({name} format needs {", ".join(fmt.required)})')
            out[f.name] = ""
        else:
            out[f.name] = f.read(value, f.name, where, tokenizer)
    return out


def render(record: dict, name: str, tokenizer: Any, cfg: DataConfig, where: str) -> Rendered | Pair:
    """Check one record's fields against format ``name`` and render it.

    Raises DataError for an unknown format (naming the known ones) or a missing or wrongly typed field
    (naming file, line and field).
    """
    fmt = FORMATS.get(name)
    if fmt is None:
        raise DataError(f"{where}: unknown format {name!r}; use {format_names()}")
    return fmt.render(read_fields(record, name, tokenizer, where), tokenizer, cfg)
