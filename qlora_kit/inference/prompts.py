"""The one place that turns a prompt, a conversation or a training record into the model's input text.

Every consumer (``generate()``, ``qlora-kit generate``, ``evaluate()``/``qlora-kit eval``, rank-sweep, the
demo, the generation metrics during training) renders through ``render_prompt`` or ``record_prompt``, and so
through the prompt contract (``data.contract``): the chat template training decided on (the tokenizer's own,
or a named template for a tokenizer without one), loaded from the adapter folder when there is one.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_kit.config import DataConfig
from qlora_kit.data import DataError
from qlora_kit.data.contract import prompt_contract
from qlora_kit.data.formats import detect_format, render
from qlora_kit.data.tokenize import to_text

REPLY_FIELDS = {"alpaca": "output", "prompt_completion": "completion"}  # the trained reply of a record format


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt: the text the model continues, and how to tokenize it."""

    text: str  # the model's input text, ending where the reply starts
    special_tokens: bool  # tokenize with the tokenizer's own special tokens (BOS): no chat template framed it


def render_prompt(
    tokenizer, prompt: str | list[dict], system: str | None = None, chat: bool = True
) -> Prompt:
    """The input for a user prompt or a list of ``{"role", "content"}`` messages ending with a user turn.

    With ``chat`` and a tokenizer chat template: the template with the generation prompt (as training renders
    the text before each reply). Otherwise the plain text (a system prompt first, then a blank line),
    tokenized with the tokenizer's BOS as training tokenizes plain text.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system:
        messages = [{"role": "system", "content": system}] + messages
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return Prompt(text, special_tokens=False)
    return Prompt("\n\n".join(m["content"] for m in messages), special_tokens=True)


def record_reference(record: dict, fmt: str) -> str | None:
    """The trained reply of a record (alpaca ``output``, ``completion``, the last assistant turn), or None."""
    if fmt == "chat":
        messages = record.get("messages") or []
        last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
        return last.get("content") if last.get("role") == "assistant" else None
    field = REPLY_FIELDS.get(fmt)
    return record.get(field) if field else None


def _with_empty_reply(record: dict, fmt: str) -> dict:
    """``record`` with an empty reply where it has none, so training's renderer accepts a bare prompt."""
    if fmt == "chat":
        messages = list(record.get("messages") or [])
        if messages and isinstance(messages[-1], dict) and messages[-1].get("role") != "assistant":
            return {**record, "messages": messages + [{"role": "assistant", "content": ""}]}
        return record
    field = REPLY_FIELDS.get(fmt)
    return {**record, field: ""} if field and record.get(field) is None else record


def record_prompt(
    tokenizer, record: dict, fmt: str = "auto", system: str | None = None, where: str = "record",
    data_config: DataConfig | None = None,
) -> tuple[Prompt, str | None]:
    """``(prompt, reference)`` for a record in any training format: the exact text training puts before the
    last reply (so the model is prompted as it was trained), and that reply (None when the record has none).

    ``data_config``: the training run's data settings, whose prompt contract (``data.chat_template``,
    ``data.system_prompt``) the tokenizer keeps; default: the tokenizer's contract as it is, with ``system``.
    Raises DataError naming ``where`` for a malformed record, or a ``text`` record (it has no prompt).
    """
    fmt = detect_format(record, where) if fmt == "auto" else fmt
    if fmt == "text":
        raise DataError(
            f"{where}: text records have no prompt and reply to generate from; score them with "
            "--metric loss, or use alpaca, chat or prompt_completion records"
        )
    reference = record_reference(record, fmt)
    cfg = data_config if data_config is not None else DataConfig(system_prompt=system or "")
    prompt_contract(tokenizer, cfg)  # as training decided it: a template-less tokenizer gets its named template
    rendered = to_text(render(_with_empty_reply(record, fmt), fmt, tokenizer, cfg, where), tokenizer, where)
    text, spans, templated = rendered.text, rendered.spans, rendered.templated
    if not spans:
        raise DataError(f"{where}: no assistant turn to answer; end the conversation with a user message")
    return Prompt(text[: spans[-1][0]], special_tokens=not templated), reference
