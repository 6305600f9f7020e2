"""Field ranges of the config dataclasses: ``ranged(default, "[lo, hi]")`` declares one, ``check_fields``
enforces the types and ranges of a whole section (interval notation: ``(`` and ``)`` exclude the bound, ``inf``
means any finite number)."""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable
from dataclasses import field
from typing import Any, Union

from qlora_kit.config_yaml import ConfigError

_INTERVAL = re.compile(r"^([\[(])([^,\s]+), ([^,\s]+)([\])])$")


def ranged(default: Any, interval: str) -> Any:
    """A dataclass field whose valid values form ``interval``, e.g. ``"[1, 65_536]"``, ``"[0, 1)"``,
    ``"(0, inf)"`` (any finite positive number); ``check_fields`` enforces it."""
    if not _INTERVAL.match(interval):
        raise ValueError(f"interval {interval!r}: write it as [lo, hi], (lo, hi), [lo, hi) or (lo, hi]")
    return field(default=default, metadata={"range": interval})


def _in_interval(value: float, interval: str) -> bool:
    """Whether ``value`` lies in ``interval`` (NaN and infinities never do)."""
    left, low, high, right = _INTERVAL.match(interval).groups()
    try:
        x = float(value)
    except OverflowError:  # an integer beyond any float: outside every declared range
        return False
    return ((float(low) <= x) if left == "[" else (float(low) < x)) and \
        ((x <= float(high)) if right == "]" else (x < float(high)))


def _has_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` is exactly of the annotated type (no conversion; bool is not a number)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):  # Optional[X] / Union[X, Y] and X | Y
        return any(_has_type(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return hint is Any or isinstance(value, hint if hint is not None else type(None))


def show_value(value: Any) -> str:
    """A short repr for messages (an integer too long to print is described by its size)."""
    try:
        text = repr(value)
    except ValueError:
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= 60 else text[:57] + "..."


def check_fields(obj: Any, where: str) -> None:
    """Raise ConfigError unless every field of the dataclass ``obj`` has its annotated type and lies in its
    declared range (each element, for a list of numbers). The message names ``where.field`` and the range."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, path = getattr(obj, f.name), f"{where}.{f.name}" if where else f.name
        if not _has_type(value, hints[f.name]):
            wanted = str(hints[f.name]).replace("typing.", "")
            wanted = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
                hints[f.name], getattr(hints[f.name], "__name__", wanted))
            raise ConfigError(f"{path}: expected {wanted}, got {show_value(value)}")
        interval = f.metadata.get("range")
        numbers = value if isinstance(value, list) else [] if value is None else [value]
        if interval and not all(_in_interval(x, interval) for x in numbers):
            raise ConfigError(f"{path}: must be in {interval}, got {show_value(value)}")


def coerce(value: Any, hint: Any, where: str, build: Callable[[type, dict, str], Any]) -> Any:
    """Check and convert one YAML value to its field's type (ConfigError naming ``where``); a section -> ``build``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of settings, got {type(value).__name__}")
        return build(hint, value, where)
    if origin in (Union, types.UnionType):  # Optional[X] / Union[X, Y] and X | Y
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where, build)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{where}: invalid value {show_value(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {show_value(value)}")
        return [coerce(v, args[0], f"{where}[{i}]", build) for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {show_value(value)}")
        return value
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false, got {show_value(value)}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {show_value(value)}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {show_value(value)}") from None
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected a number, got {show_value(value)}")
        try:
            return float(value)
        except (ValueError, OverflowError):
            raise ConfigError(f"{where}: expected a number, got {show_value(value)}") from None
    if hint is str:
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            return "on" if value else "off"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {show_value(value)}")
        try:
            return str(value)
        except ValueError:  # an integer with more digits than Python prints
            raise ConfigError(f"{where}: expected a string, got {show_value(value)}") from None
    return value
