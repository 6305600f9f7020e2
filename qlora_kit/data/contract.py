"""The prompt contract: the one text layout a model is trained in, decided once and saved with the adapter.

``prompt_contract(tokenizer, cfg)`` decides it when the data is first tokenized: the tokenizer's own chat
template when it has one (and ``data.chat_template`` is ``auto``), else a named template (``templates``) or
a Jinja file, with the BOS token first when the tokenizer adds one to plain text. The tokenizer's
``chat_template`` is set to the result, so training, ``generate``/``eval`` and transformers'
``apply_chat_template`` all render the same text. ``data.system_prompt`` becomes part of the template: the
system message of every conversation that has none.

An adapter folder holds the contract as ``chat_template.jinja`` (the file transformers reads beside a
tokenizer) and ``prompt_contract.json`` (how it was chosen, BOS/EOS handling, the system prompt). The full
tokenizer is saved there only when training added tokens (the merge copies it); otherwise the base's
tokenizer plus the template reproduces the prompt:
``AutoTokenizer.from_pretrained(base, chat_template=open("adapter/chat_template.jinja").read())``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Any

from qlora_kit.config import DataConfig
from qlora_kit.data.templates import AUTO, named_or_file, template_text

log = logging.getLogger("qlora_kit")

CONTRACT_FILE = "prompt_contract.json"  # our metadata beside the adapter
TEMPLATE_FILE = "chat_template.jinja"  # the template, where transformers looks for it


@dataclasses.dataclass(frozen=True)
class PromptContract:
    """How every prompt of a model is rendered, from training to serving."""

    template: str  # "tokenizer" (its own chat template), a templates.TEMPLATES name, or a Jinja file's path
    chat_template: str  # the Jinja text every conversation is rendered with (BOS and system prompt included)
    add_bos: bool  # a named template writes the BOS token first (because the tokenizer adds one to plain text)
    bos_token: str | None  # the tokenizer's BOS token
    eos_token: str | None  # the tokenizer's EOS token: generation stops there
    eos_appended: bool  # training appends EOS after each reply (the template ends a turn with another token)
    system_prompt: str  # system message of every conversation without one ("" for none)
    requested: str = "auto"  # data.chat_template as configured
    own_template: str | None = dataclasses.field(default=None, repr=False)  # the tokenizer's template before

    def describe(self) -> str:
        """One line for the log and ``qlora-kit validate``."""
        if self.template == "tokenizer":
            what = "the tokenizer's chat template"
        else:
            why = "; the tokenizer has none" if self.requested == "auto" else ""
            what = f"the {self.template} template (data.chat_template={self.requested}{why})"
        extras = (["BOS first"] if self.add_bos else []) + (["EOS appended"] if self.eos_appended else []) + \
            ([f"system prompt {self.system_prompt[:40]!r}"] if self.system_prompt else [])
        return f"prompt: {what}" + (f", {', '.join(extras)}" if extras else "")

    def as_json(self) -> dict:
        """The metadata saved as prompt_contract.json (the template itself goes to chat_template.jinja)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("chat_template", "own_template")}


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS token before plain text (``add_special_tokens=True``)."""
    bos = tokenizer.bos_token_id
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    without = tokenizer("x", add_special_tokens=False)["input_ids"]
    return bos is not None and with_special[:1] == [bos] and without[:1] != [bos]


def _eos_appended(tokenizer: Any) -> bool:
    """Whether the template ends a reply without the EOS token (training then appends it)."""
    user = [{"role": "user", "content": "x"}]
    try:
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "y"}], tokenize=False)
    except Exception:  # a template that rejects the probe: tokenization reports the real record's problem
        return True
    return tokenizer.eos_token is None or tokenizer.eos_token not in full[len(prompt):]


def decide(tokenizer: Any, cfg: DataConfig, own: str | None) -> PromptContract:
    """The contract for ``cfg`` on a tokenizer whose own chat template is ``own`` (None: it has none).

    Raises DataError for a ``data.chat_template`` that is neither a known name nor a Jinja file.
    """
    if own and cfg.chat_template == "auto":
        name, body, bos = "tokenizer", own, False
    else:
        name = AUTO if cfg.chat_template == "auto" else cfg.chat_template
        body, bos = named_or_file(name), adds_bos(tokenizer)
    text = template_text(body, bos, cfg.system_prompt)
    tokenizer.chat_template = text
    return PromptContract(name, text, bos, tokenizer.bos_token, tokenizer.eos_token, _eos_appended(tokenizer),
                          cfg.system_prompt, cfg.chat_template, own)


def prompt_contract(tokenizer: Any, cfg: DataConfig, announce: bool = True) -> PromptContract:
    """The tokenizer's contract for ``cfg``, deciding it (and setting ``tokenizer.chat_template``) on first use.

    Idempotent: a tokenizer keeps its contract while ``data.chat_template`` and ``data.system_prompt`` stay
    the same. A decided template other than the tokenizer's own is logged when ``announce`` (data preparation
    passes False: its caller's summary names the prompt). Raises DataError for an unknown ``data.chat_template``.
    """
    current = getattr(tokenizer, "qlora_prompt_contract", None)
    if current is not None and tokenizer.chat_template == current.chat_template:
        if (current.requested, current.system_prompt) == (cfg.chat_template, cfg.system_prompt):
            return current
        own = current.own_template
    else:
        own = getattr(tokenizer, "chat_template", None) or None
    contract = decide(tokenizer, cfg, own)
    tokenizer.qlora_prompt_contract = contract
    if contract.template != "tokenizer" and announce:
        log.info("%s", contract.describe())
    return contract


def apply_contract(tokenizer: Any, folder: str | Path) -> PromptContract | None:
    """Give ``tokenizer`` the chat template of the contract saved in ``folder`` (an adapter or merged model);
    return the contract, or None when the folder has none (an adapter saved by PEFT or an older qlora-kit:
    the tokenizer is left as is). Data prepared with the tokenizer afterwards keeps this template (it is
    then the tokenizer's own)."""
    contract = load_contract(folder)
    if contract is not None:
        tokenizer.chat_template = contract.chat_template
        tokenizer.qlora_prompt_contract = None
    return contract


def load_contract(folder: str | Path) -> PromptContract | None:
    """The contract saved in ``folder``, or None when it has no prompt_contract.json."""
    folder = Path(folder)
    if not (folder / CONTRACT_FILE).is_file():
        return None
    meta = json.loads((folder / CONTRACT_FILE).read_text())
    known = {f.name for f in dataclasses.fields(PromptContract)}
    return PromptContract(chat_template=(folder / TEMPLATE_FILE).read_text(encoding="utf-8"),
                          **{k: v for k, v in meta.items() if k in known})


@functools.lru_cache(maxsize=4)
def _base_vocab(base: str) -> int | None:
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(base))
    except Exception:  # a tokenizer we cannot load here: keep the adapter's full copy
        return None


def save_contract(tokenizer: Any, folder: str | Path, base: str | Path | None = None) -> None:
    """Write the tokenizer's contract into ``folder``: chat_template.jinja and prompt_contract.json, and the
    full tokenizer only when its vocabulary differs from ``base``'s (tokens added in training) or ``base``
    is unknown. The tokenizer must have a contract (``prompt_contract``)."""
    if base is None or _base_vocab(str(base)) != len(tokenizer):
        tokenizer.save_pretrained(str(folder))
    write_contract(tokenizer.qlora_prompt_contract, folder)


def write_contract(contract: PromptContract, folder: str | Path) -> None:
    """Write ``contract`` as chat_template.jinja and prompt_contract.json into ``folder``; a tokenizer there
    (tokenizer_config.json's inline ``chat_template``, chat_template.json) is left no other template."""
    folder = Path(folder)
    (folder / TEMPLATE_FILE).write_text(contract.chat_template, encoding="utf-8")
    (folder / CONTRACT_FILE).write_text(json.dumps(contract.as_json(), indent=2) + "\n")
    (folder / "chat_template.json").unlink(missing_ok=True)
    config = folder / "tokenizer_config.json"
    if config.is_file():
        settings = json.loads(config.read_text(encoding="utf-8"))
        if settings.pop("chat_template", None) is not None:
            config.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
