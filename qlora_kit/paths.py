"""Output paths that can never destroy an input: ``--out`` may not be, contain or lie inside any input."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from qlora_kit.config import ConfigError


class OutputPathError(ConfigError):
    """An output path collides with one of the command's inputs; nothing was read or written."""


def _identity(path: str) -> tuple[int, int] | None:
    """``(device, inode)`` of what ``path`` points to (symlinks followed), or None if it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _chain(path: Path) -> set[tuple[int, int]]:
    """Identities of ``path`` and of every existing folder above it, along both its written and its real path.

    Comparing identities rather than strings also catches symlinks (to the path or to a folder above it),
    bind mounts and case-insensitive file systems; a path that does not exist yet is placed through its
    nearest existing parent.
    """
    ids = set()
    for start in (os.path.abspath(path), os.path.realpath(path)):
        p = Path(start)
        for q in (p, *p.parents):
            ident = _identity(str(q))
            if ident is not None:
                ids.add(ident)
    return ids


def _relation(out: Path, out_chain: set, inp: Path) -> str | None:
    """How ``out`` collides with input ``inp``: "is", "lies inside", "contains", or None."""
    inp_id = _identity(str(inp))
    if inp_id is None:  # a missing input holds nothing to lose; its own check reports it
        return None
    out_id = _identity(str(out))
    if out_id == inp_id:
        return "is"
    if inp_id in out_chain:
        return "lies inside"
    if out_id is not None and out_id in _chain(inp):
        return "contains"
    return None


def check_output_path(out: str | Path, inputs: Mapping[str, str | Path | None], out_flag: str = "--out") -> None:
    """Refuse an output path that is, contains or lies inside one of ``inputs``, before any work.

    Args:
        out: the folder (or file) the command will write or replace.
        inputs: flag name -> input path, e.g. ``{"--base": base, "--adapter": adapter}``; None values are skipped.
        out_flag: the output's flag name, used in the message.
    Raises:
        OutputPathError (a ConfigError: CLI exit 2) naming the flag, the input it collides with, and the fix.
        This holds with or without ``--overwrite``: writing there would delete or change the input.
    """
    out = Path(out)
    out_chain = _chain(out)
    for flag, inp in inputs.items():
        if inp is None:
            continue
        relation = _relation(out, out_chain, Path(inp))
        if relation is not None:
            raise OutputPathError(
                f"{out_flag} {out} {relation} the input {flag} {inp}: writing there would delete or change it "
                f"(with or without --overwrite); choose an {out_flag} that neither is, contains nor lies inside {inp}")
