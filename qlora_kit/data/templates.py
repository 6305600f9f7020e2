"""Named chat templates for tokenizers without one, as Jinja text that transformers' ``apply_chat_template`` runs.

Training renders every conversation through a chat template, so the same template text, saved with the
adapter and the merged model, makes any ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``
produce the exact prompt the model was trained on. Each template is a ``TEMPLATES`` entry; ``template_text``
adds the BOS token first when the contract asks for it and, with a system prompt, a system message in front
of every conversation that has none.

Every template here is prefix-stable (the text for the first k messages is a prefix of the whole), writes a
generation prompt with ``add_generation_prompt``, and ends each assistant turn the way the layout names:
alpaca and completion with the EOS token, chatml with ``<|im_end|>``, llama3 with ``<|eot_id|>``.
"""
from __future__ import annotations

import json
from pathlib import Path

from qlora_kit.data import DataError

ALPACA = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '### Response:\n' + m['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
COMPLETION = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
)

TEMPLATES: dict[str, str] = {
    "alpaca": ALPACA,  # ### Instruction: / ### Response: blocks; the reply ends with EOS (auto's pick)
    "chatml": CHATML,  # <|im_start|>role ... <|im_end|> turns
    "llama3": LLAMA3,  # <|start_header_id|>role<|end_header_id|> ... <|eot_id|> turns
    "completion": COMPLETION,  # prompt and reply joined as they are, the reply ending with EOS
}
AUTO = "alpaca"  # the template ``data.chat_template: auto`` picks for a tokenizer without one


def named_or_file(name: str) -> str:
    """The Jinja text of template ``name``: a ``TEMPLATES`` key or a path to a Jinja file.

    Raises DataError naming the known templates when ``name`` is neither.
    """
    if name in TEMPLATES:
        return TEMPLATES[name]
    path = Path(name)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise DataError(f"data.chat_template: {name!r} is neither a known template ({', '.join(TEMPLATES)}, auto) "
                    "nor a Jinja file; use one of those names or the path of a .jinja file")


def template_text(body: str, add_bos: bool, system_prompt: str) -> str:
    """``body`` with ``{{ bos_token }}`` first when ``add_bos``, and ``system_prompt`` as the system message of
    every conversation that does not start with one (when it is not empty)."""
    head = ""
    if system_prompt:
        literal = json.dumps(system_prompt, ensure_ascii=False)  # a valid Jinja string literal
        head = ("{% if messages and messages[0]['role'] != 'system' %}"
                f"{{% set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}{{% endif %}}")
    return head + ("{{ bos_token }}" if add_bos else "") + body
