"""Atomic writes: a file or folder appears complete under its final name, or not at all."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class WriteError(OSError):
    """A write failed (disk full, permissions); the message says what was kept and what to do."""


def _explain(e: OSError, target: Path) -> WriteError:
    if e.errno == errno.ENOSPC:
        msg = f"{target}: no space left on device; nothing was replaced (free disk space and retry)"
    else:
        msg = f"{target}: write failed ({e.strerror or e}); nothing was replaced"
    err = WriteError(e.errno or 0, msg)
    err.filename = str(target)
    return err


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_replaceable(target: str | Path, overwrite: bool, ours: tuple[str, ...], kind: str) -> None:
    """Refuse to replace an existing ``target`` unless ``overwrite`` and it is recognisably ours.

    ``ours`` names the files one of which every earlier output of this ``kind`` holds (e.g. ``merge_report.json``);
    an empty folder may always be replaced. Anything else (a file, a symlink, a folder of the user's) is never
    deleted, even with ``overwrite``. Raises FileExistsError saying what to do; call it before any work.
    """
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if target.is_dir() and not target.is_symlink() and (
            not any(target.iterdir()) or any((target / name).is_file() for name in ours)):
        return
    has = f"holds none of {', '.join(ours)}" if ours else "is not empty"
    raise FileExistsError(f"{target} exists and is not a previous {kind} output (it {has}), so it is never replaced, "
                          "even with --overwrite; choose a new output path, or move or delete it yourself")


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_modes(folder: Path) -> None:
    """Give ``folder`` and everything in it the user's normal modes: 0777 (folders) or 0666 (files) minus the umask.

    ``mkdtemp`` makes the folder 0700 and libraries writing into it may create 0600 files (safetensors'
    ``save_file`` does); outputs must not keep those modes.
    """
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name, mode in [(d, 0o777) for d in dirs] + [(f, 0o666) for f in files]:
            path = os.path.join(root, name)
            if not os.path.islink(path):  # a link's own mode is meaningless; never chmod its target
                os.chmod(path, mode & ~mask)


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = True, ours: tuple[str, ...] = (),
               kind: str = "qlora-kit") -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; on success rename it to ``target``.

    On any exception the temporary folder is removed and ``target`` is left as it was. An existing ``target``
    is replaced only as ``check_replaceable(target, overwrite, ours, kind)`` allows (FileExistsError before
    anything is written otherwise). The folder and its contents get the user's normal permissions (0777 or
    0666 minus the umask), whatever created them.
    """
    target = Path(target)
    check_replaceable(target, overwrite, ours, kind)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _normal_modes(tmp)
        _fsync_dir(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (WriteError, FileExistsError, FileNotFoundError)):
            raise
        raise _explain(e, target) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename; the file gets 0666 minus the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the user's normal mode
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _explain(e, path) from e


def atomic_write_json(path: str | Path, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """Serialize tensors to safetensors with a canonical header (sorted metadata), so equal inputs give equal bytes.

    safetensors writes its metadata map in hash order; re-serializing the header with sorted keys (same length,
    so the data offsets stay valid) makes the file reproducible byte for byte.
    """
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if len(canonical) > n:  # cannot happen for a reordering; keep the original rather than corrupt offsets
        return raw
    return raw[:8] + canonical + b" " * (n - len(canonical)) + raw[8 + n:]
