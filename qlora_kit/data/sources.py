"""Reading records: JSONL, JSON, CSV and Parquet files or in-memory lists, each record with where it came from."""
from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qlora_kit.data import DataError

Row = tuple[str, dict]  # (where, record); where is e.g. "data/train.jsonl line 17" (1-based), for error messages


def load_records(path: str | Path) -> list[dict]:
    """Read the records of a .jsonl, .json, .csv or .parquet file as dicts.

    Raises DataError naming the file and line for a missing file, malformed JSON or a non-object record.
    """
    return [record for _, record in read_records(Path(path))]


def read_records(path: Path) -> list[Row]:
    """``(where, record)`` pairs of a data file; raises DataError as ``load_records`` does."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found (set data.train_file / data.eval_file to an existing file)")
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise DataError(f"{path}: unknown file type {suffix!r}; use .jsonl, .json, .csv or .parquet")
    try:
        return readers[suffix](path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); "
                        "save the file as UTF-8") from None


def in_memory_records(records: Iterable[dict], name: str) -> list[Row]:
    """``(where, record)`` pairs for a ``datasets.Dataset`` or a list of dicts; ``where`` is ``<name> record <i>``."""
    if hasattr(records, "to_list"):
        records = records.to_list()
    return [(f"{name} record {i}", _object(r, f"{name} record {i}")) for i, r in enumerate(records, 1)]


def read_source(path: str, records: Any, name: str) -> tuple[list[Row], bytes, str]:
    """Rows, the bytes that key the token cache, and a display name for a file or in-memory records.

    ``records`` (a ``datasets.Dataset`` or list of dicts) wins over ``path``; ``name`` is the config key
    (``train_file`` / ``eval_file``). Raises DataError when neither is given or the file is unreadable.
    """
    if records is not None:
        rows = in_memory_records(records, name)
        return rows, json.dumps([r for _, r in rows], sort_keys=True, default=str).encode(), name
    if not path:
        raise DataError(f"data.{name}: no file given; set data.{name} to a JSONL, JSON, CSV or Parquet file")
    p = Path(path)
    rows = read_records(p)
    return rows, p.read_bytes(), str(p)


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object with the record's fields, got {type(value).__name__}")
    return value


def _read_jsonl(path: Path) -> list[Row]:
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (column {e.start + 1} holds byte "
                                f"{raw[e.start:e.start + 1]!r}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); each line must be one "
                                "complete JSON object") from None
            out.append((where, _object(value, where)))
    return out


def _read_json(path: Path) -> list[Row]:
    text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and "\n" in text.strip():
            return _read_jsonl(path)  # JSON Lines saved as .json
        raise DataError(f"{path} line {e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of records (or JSON Lines), got {type(value).__name__}")
    return [(f"{path} record {i}", _object(v, f"{path} record {i}")) for i, v in enumerate(value, 1)]


def _read_csv(path: Path) -> list[Row]:
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        start = reader.line_num + 1
        for row in reader:
            out.append((f"{path} line {start}", {k: v for k, v in row.items() if k is not None}))
            start = reader.line_num + 1
    return out


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: cannot read Parquet ({e})") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(rows, 1)]
