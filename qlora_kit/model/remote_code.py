"""Refuse, in one line, a checkpoint folder whose model or tokenizer needs its own Python code (``auto_map``).

transformers runs such code only with ``trust_remote_code=True``; without it, it raises a multi-line
ValueError deep inside ``from_pretrained``. ``check_remote_code`` reads the folder's ``config.json`` and
``tokenizer_config.json`` before anything is loaded. An ``auto_map`` that transformers does not need (the
model type or tokenizer class is built in, e.g. a Llama checkpoint that also ships modelling code) is not
refused: transformers then uses its own class and runs nothing from the folder.
"""
from __future__ import annotations

import json
from pathlib import Path

from qlora_kit.config import ConfigError


def _json(path: Path) -> dict:
    """The file's JSON object, or {} when it is missing or not an object (other checks report those)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _custom_classes(folder: Path) -> tuple[Path, list[str]] | None:
    """(file, class references) of the first auto_map transformers would have to run code for; None if none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name

    config = _json(folder / "config.json")
    model_type = config.get("model_type")
    auto_map = config.get("auto_map")
    if auto_map and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return folder / "config.json", [str(v) for v in (auto_map.values() if isinstance(auto_map, dict) else [auto_map])]
    tok_config = _json(folder / "tokenizer_config.json")
    auto_map = tok_config.get("auto_map")
    if isinstance(auto_map, dict):
        auto_map = auto_map.get("AutoTokenizer")
    if not auto_map or model_type in TOKENIZER_MAPPING_NAMES:
        return None
    name = tok_config.get("tokenizer_class")
    if isinstance(name, str) and (tokenizer_class_from_name(name) or tokenizer_class_from_name(name + "Fast")):
        return None
    return folder / "tokenizer_config.json", [str(v) for v in (auto_map if isinstance(auto_map, list) else [auto_map])
                                               if v]


def check_remote_code(folder: str | Path, trust_remote_code: bool = False) -> None:
    """Raise ConfigError when loading ``folder`` would need its own code and ``trust_remote_code`` is off.

    Checks the ``auto_map`` of ``config.json`` (the model) and of ``tokenizer_config.json`` (the tokenizer).
    """
    if trust_remote_code:
        return
    found = _custom_classes(Path(folder))
    if found is not None:
        file, classes = found
        raise ConfigError(f"{file}: auto_map asks to run custom code ({', '.join(classes)[:80]}) that transformers "
                          "has no built-in class for; qlora-kit runs a checkpoint's own code only when told to: set "
                          "model.trust_remote_code: true if you trust it")
