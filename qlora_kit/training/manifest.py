"""Folder manifests: the size and sha256 of every file, written last, checked before the files are trusted.

``manifest.json`` = ``{"format": "qlora-kit-manifest", "version": 1, "files": {name: {"size", "sha256"}}}``.
Any change to a listed file after the manifest was written (truncation, garbage, a single flipped bit)
shows up as a size or sha256 mismatch. Files that are not listed are not covered (and must not be read).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qlora_kit.atomic import atomic_write_bytes

MANIFEST_FILE = "manifest.json"
FORMAT, VERSION = "qlora-kit-manifest", 1


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, hex sha256) of ``path``, read in chunks. Raises OSError if it cannot be read."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256")
    return path.stat().st_size, digest.hexdigest()


def write_manifest(folder: Path) -> Path:
    """Hash every file directly inside ``folder`` and write ``folder/manifest.json`` atomically (call it last)."""
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != MANIFEST_FILE and not p.name.startswith("."):
            size, sha = file_digest(p)
            files[p.name] = {"size": size, "sha256": sha}
    target = folder / MANIFEST_FILE
    atomic_write_bytes(target, (json.dumps({"format": FORMAT, "version": VERSION, "files": files},
                                           indent=2) + "\n").encode())
    return target


def _read_entries(folder: Path) -> dict[str, dict]:
    """The manifest's ``files`` map; raises ValueError with the reason when it is not a manifest we understand."""
    try:
        raw = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"line {e.lineno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("files"), dict):
        raise ValueError(f"not a {FORMAT} (expected an object with \"format\" and \"files\")")
    if not isinstance(raw.get("version"), int) or raw["version"] > VERSION:
        raise ValueError(f"format version {raw.get('version')!r}; this qlora-kit reads version {VERSION} "
                         "(upgrade qlora-kit)")
    return raw["files"]


def _entry_problem(folder: Path, name: str, entry) -> str | None:
    """Why file ``name`` does not match its manifest ``entry``, or None when it does."""
    if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str):
        return f"{MANIFEST_FILE}: the entry for {name!r} has no valid size/sha256"
    if Path(name).name != name or name in (".", ".."):
        return f"{MANIFEST_FILE}: lists {name!r}, which is not a file name inside the folder"
    path = folder / name
    if not path.is_file():
        return f"{name}: missing (the manifest lists it)"
    size, sha = file_digest(path)
    if size != entry["size"]:
        return f"{name}: {size} bytes, the manifest says {entry['size']} (truncated or changed after it was written)"
    if sha != entry["sha256"]:
        return f"{name}: sha256 differs from the manifest (changed or corrupted after it was written)"
    return None


def check_manifest(folder: Path) -> tuple[list[str] | None, list[tuple[str, str]]]:
    """Check ``folder`` against its manifest: (the file names it lists, [(file name, problem), ...]).

    Each problem is one human-readable line starting with the file's name; no problems means every listed
    file has its recorded size and sha256. No manifest gives ``(None, [])``; an unreadable one ``([], [its
    problem])``. Never raises for bad files: an unreadable file is reported as a problem.
    """
    if not (folder / MANIFEST_FILE).exists():
        return None, []
    try:
        entries = _read_entries(folder)
    except (OSError, ValueError, RecursionError) as e:
        return [], [(MANIFEST_FILE, f"{MANIFEST_FILE}: {e}")]
    problems = []
    for name, entry in entries.items():
        try:
            problem = _entry_problem(folder, name, entry)
        except OSError as e:
            problem = f"{name}: cannot be read ({e.strerror or e})"
        if problem:
            problems.append((name, problem))
    return list(entries), problems
