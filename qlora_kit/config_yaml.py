"""Reading config YAML: a strict loader (a key set twice is an error), ``key=value`` overrides, and the file
line of a dotted key for error messages.

This is the lowest config layer, so ``ConfigError`` is defined here; ``qlora_kit.config`` re-exports it with
everything else, and callers import it from there.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid. The message says where and how to fix it."""


class DuplicateKeyError(yaml.MarkedYAMLError):
    """One mapping sets the same key twice; ``problem`` names the key and both lines."""


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter in two ways. A key set twice in one mapping is an error naming both
    lines (plain YAML keeps the last value and silently drops the first, a whole section when a section is
    repeated). A scalar PyYAML cannot convert (a 5000-digit integer, the date 2024-13-45) is a marked YAML
    error instead of a bare ValueError."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._paths: dict[int, str] = {}  # id(value node) -> its dotted key path, to name nested duplicates

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        parent, first_line = self._paths.get(id(node), ""), {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # complex keys are refused by the base class; merge keys (<<) may be overridden
            key = self.construct_object(key_node)
            path = f"{parent}.{key}" if parent else str(key)
            self._paths[id(value_node)] = path
            line = key_node.start_mark.line + 1
            if key in first_line:
                problem = (f"section {path} appears twice (lines {first_line[key]} and {line}); merge them into one"
                           if isinstance(value_node, yaml.MappingNode) else
                           f"{path} is set twice (lines {first_line[key]} and {line}); keep one")
                raise DuplicateKeyError(None, None, problem, key_node.start_mark)
            first_line[key] = line
        return super().construct_mapping(node, deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as e:  # int("9" * 5000), datetime(2024, 13, 45)
            text = str(node.value)
            problem = (f"an integer of {len(text)} characters is too large for any setting"
                       if node.tag.endswith(":int") else f"cannot read the value {text[:40]!r}: {e}")
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


def parse_yaml(text: str) -> Any:
    """Parse YAML text with ``StrictLoader``. Raises yaml.YAMLError (with a mark where known)."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # StrictLoader is a SafeLoader
    except RecursionError:
        raise yaml.YAMLError("nested too deeply to be a config") from None


def _yaml_problem(e: yaml.YAMLError) -> tuple[str, str]:
    """(" line N" or "", what is wrong) of a YAML error."""
    mark = getattr(e, "problem_mark", None)
    line = f" line {mark.line + 1}" if mark else ""
    problem = getattr(e, "problem", None) or str(e)
    return line, problem if isinstance(e, DuplicateKeyError) else f"invalid YAML: {problem}"


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with errors that name the file and line (duplicate keys included)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    except yaml.YAMLError as e:
        line, problem = _yaml_problem(e)
        raise ConfigError(f"{path}{line}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, lora, data, training)")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value in YAML syntax) into a key path and a value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. lora.r=8")
    key, raw = text.split("=", 1)
    try:
        return key.strip().split("."), parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(e)[1]}); "
                          "quote it, e.g. key='value'") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each ``a.b=value`` override into the nested dict ``data`` (in place) and return it."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
        node[path[-1]] = value
    return data


def compose_file(path: Path) -> yaml.Node | None:
    """The YAML node tree of ``path`` (keys keep their line numbers), or None if it cannot be read."""
    try:
        return yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (yaml.YAMLError, OSError, UnicodeDecodeError, RecursionError):
        return None


def line_of(root: yaml.Node | None, dotted: str) -> int | None:
    """The 1-based line of the key ``dotted`` (``lora.r``) in a composed file: the deepest part found."""
    line, node = None, root
    for part in dotted.split("."):
        if not isinstance(node, yaml.MappingNode):
            break
        hit = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part), None)
        if hit is None:
            break
        line, node = hit[0].start_mark.line + 1, hit[1]
    return line


_ERROR_KEY = re.compile(r"^(?:unknown config key ')?([A-Za-z_]\w*(?:\.\w+)*)")


def key_line(path: Path, message: str, overridden: set[str]) -> int | None:
    """The 1-based line of the YAML key an error message starts with (``lora.r: ...``), if the file has it
    and no ``key=value`` override replaced it."""
    match = _ERROR_KEY.match(message)
    if not match or match.group(1) in overridden:
        return None
    return line_of(compose_file(path), match.group(1))
