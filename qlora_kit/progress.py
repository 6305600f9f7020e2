"""The one progress bar: tqdm with an ETA, used by every phase that can take more than a few seconds.

Training, generation, evaluation, merge and GGUF verification and the demo's evaluations all show the same
bar (count, rate and time left), written to stderr, so stdout stays the command's answer.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def progress_bar(iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
                 enabled: bool = True) -> Any:
    """A tqdm bar over ``iterable`` (or ``total`` updates) labelled ``desc``; a silent no-op when not ``enabled``.

    Returns the tqdm object: iterate it, or call ``update(n)`` and ``close()``.
    """
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)
