"""Examples -> micro-batches (shuffled, length-grouped or packed) -> padded tensors."""
from __future__ import annotations

import logging
import random
from bisect import bisect_left, insort

import torch

from qlora_kit.config import DataConfig
from qlora_kit.data import IGNORE_INDEX
from qlora_kit.data.preference import PreferenceExample, n_tokens
from qlora_kit.data.prepare import DataStats, Prepared
from qlora_kit.data.tokenize import Example

log = logging.getLogger("qlora_kit")


def _pack_rows(lengths: list[int], max_len: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of example indices into rows of at most ``max_len`` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, row number)
    for i in order:
        at = bisect_left(free, (lengths[i], -1))
        if at == len(free):
            rows.append([i])
            insort(free, (max_len - lengths[i], len(rows) - 1))
        else:
            cap, r = free.pop(at)
            rows[r].append(i)
            insort(free, (cap - lengths[i], r))
    return rows


def _next_fit(lengths: list[int], max_len: int) -> list[list[int]]:
    """Positions in order, cut into consecutive rows of at most ``max_len`` tokens (collate's packing)."""
    rows: list[list[int]] = []
    used = max_len
    for i, n in enumerate(lengths):
        if n > max_len:
            raise ValueError(f"example of {n} tokens does not fit max_seq_len={max_len}; truncate it first")
        if used + n > max_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def make_batches(examples: Prepared, batch_size: int, cfg: DataConfig, seed: int, epoch: int,
                 stats: DataStats | None = None) -> list[list[int]]:
    """One epoch's micro-batches as lists of indices into ``examples``, fixed by ``(seed, epoch)``.

    - ``cfg.packing``: examples are bin-packed into rows of <= ``cfg.max_seq_len`` tokens; each batch holds
      the members of ``batch_size`` rows, row after row, and ``collate(..., packing=True)`` rebuilds them.
    - ``cfg.group_by_length``: shuffled, then sorted by length inside mega-chunks of ``50 * batch_size``;
      the batches are shuffled again.
    - otherwise a plain shuffle. The last batch may be smaller.
    A preference pair's length is its two sides' tokens together. ``stats.padding_fraction`` is filled in if given.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    lengths = [n_tokens(e) for e in examples]
    if cfg.packing:
        rows = _pack_rows(lengths, cfg.max_seq_len)
        rng.shuffle(rows)
        batches = [[i for row in rows[k:k + batch_size] for i in row] for k in range(0, len(rows), batch_size)]
    else:
        order = list(range(len(examples)))
        rng.shuffle(order)
        if cfg.group_by_length:
            mega = 50 * batch_size
            order = [i for k in range(0, len(order), mega)
                     for i in sorted(order[k:k + mega], key=lambda j: -lengths[j])]
        batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
        if cfg.group_by_length:
            rng.shuffle(batches)
    if stats is not None:
        stats.padding_fraction = padding_fraction(examples, batches, cfg.packing, cfg.max_seq_len)
        log.info("epoch %d: %d batches, padding %.1f%%", epoch, len(batches), 100 * stats.padding_fraction)
    return batches


def padding_fraction(examples: Prepared, batches: list[list[int]], packing: bool, max_seq_len: int) -> float:
    """Padded slots / all slots of the tensors ``collate`` would build for ``batches``."""
    real = slots = 0
    for batch in batches:
        lengths = [n_tokens(examples[i]) for i in batch]
        rows = [sum(lengths[j] for j in r) for r in _next_fit(lengths, max_seq_len)] if packing else lengths
        real += sum(rows)
        slots += len(rows) * max(rows, default=0)
    return 1.0 - real / slots if slots else 0.0


def collate(examples: list[Example], pad_id: int, packing: bool, max_seq_len: int) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch, right-padded to its longest row.

    Not packed: ``input_ids``, ``labels`` (IGNORE_INDEX on padding), ``attention_mask``, all ``[b, s]``.
    Packed: examples are laid in order into rows of <= ``max_seq_len`` tokens; returns ``input_ids``, ``labels``
    and ``position_ids`` (restarting at 0 for every example and for the padding tail) and NO attention_mask:
    with position_ids and no mask, transformers confines attention to each packed example. The first label of
    every example is IGNORE_INDEX so no example's last token is trained to predict the next example's start.
    """
    lengths = [len(e.input_ids) for e in examples]
    rows = _next_fit(lengths, max_seq_len) if packing else [[i] for i in range(len(examples))]
    width = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [b, s]
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # [b, s]
    positions = torch.zeros((len(rows), width), dtype=torch.long)  # [b, s]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [b, s]
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            ids[r, at:at + n] = torch.tensor(examples[i].input_ids)
            labels[r, at + 1:at + n] = torch.tensor(examples[i].labels[1:], dtype=torch.long)
            positions[r, at:at + n] = torch.arange(n)
            mask[r, at:at + n] = 1
            at += n
        positions[r, at:] = torch.arange(width - at)  # padding: a segment of its own
    if packing:
        return {"input_ids": ids, "labels": labels, "position_ids": positions}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_pairs(pairs: list[PreferenceExample], pad_id: int, max_seq_len: int) -> dict[str, torch.Tensor]:
    """``collate`` of the chosen sides then the rejected sides of ``pairs`` (never packed): ``[2b, s]`` tensors
    whose rows ``[0, b)`` are chosen and ``[b, 2b)`` rejected, so a pair goes through one forward."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, False, max_seq_len)
