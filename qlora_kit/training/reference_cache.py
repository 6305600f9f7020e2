"""DPO's reference log-probs, computed once per pair before training and kept in the run folder.

The reference (the bare base, or the frozen starting adapter) never changes during a run, so its summed
response log-probs are a fixed number per (pair, side). ``training.reference_logps``: "live" runs the reference
forward in every step; "cache" computes every pair's two numbers once (a tqdm bar), writes them to
``<run>/reference_logps.safetensors`` (never pickle) and feeds them to the loss through the batch
(``attach``); "auto" caches when the run visits at least as many pairs as the data holds (then the one pass
costs no more than the live forwards it replaces), else runs live. The log says which, and why.

The file's header holds a key: the sha256 of the tokenized pairs (train, then eval), the reference (its adapter
files' sha256, or "base"), the model (config.json and each weight file's name, size and mtime), the quantization,
the compute dtype and the loss chunk size; and the sha256 of the numbers themselves. A resumed run reuses a
file whose key and digest match; a stale (another key), damaged or unreadable file is recomputed with a log
line, never used. The numbers are computed in batches of ``training.batch_size`` pairs in data order, so they
are the same in every session (a resume is bit-identical either way).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from qlora_kit.atomic import atomic_write_bytes, safetensors_bytes
from qlora_kit.config import TrainConfig
from qlora_kit.data.batching import collate_pairs
from qlora_kit.data.preference import PreferenceExample
from qlora_kit.model.adapter_check import CONFIG_FILE, WEIGHTS_FILE
from qlora_kit.training.manifest import file_digest
from qlora_kit.training.objectives import reference_logps
from qlora_kit.training.run import Run

log = logging.getLogger("qlora_kit")

CACHE_FILE = "reference_logps.safetensors"
FORMAT, VERSION = "qlora-kit-reference-logps", 1
SPLITS = ("train", "eval")


@dataclass
class ReferenceLogps:
    """The reference's summed response log-probs per pair: ``[pairs, 2]`` fp32 (chosen, rejected) per split."""

    train: torch.Tensor  # [n_train, 2]
    eval: torch.Tensor  # [n_eval, 2]

    def rows(self, split: str, indices: list[int]) -> torch.Tensor:
        """``[2b]`` for the pairs ``indices`` of ``split``, chosen sides first (the row order of ``collate_pairs``)."""
        table = getattr(self, split)[indices]  # [b, 2]
        return torch.cat([table[:, 0], table[:, 1]])

    def digest(self) -> str:
        """sha256 of the numbers (both splits, fp32 bytes)."""
        h = hashlib.sha256()
        for split in SPLITS:
            h.update(getattr(self, split).contiguous().numpy().tobytes())
        return h.hexdigest()


def use_cache(config: TrainConfig, pair_visits: int, pairs: int) -> tuple[bool, str]:
    """Whether to cache, and why, for a run that feeds ``pair_visits`` pairs to the loss over data of ``pairs``."""
    choice = config.training.reference_logps
    if choice != "auto":
        return choice == "cache", f"training.reference_logps={choice}"
    if pair_visits >= pairs:
        return True, f"auto: the run visits {pair_visits} pairs, the one pass over {pairs} pays for itself"
    return False, f"auto: the run visits only {pair_visits} of {pairs} pairs, fewer than one pass would compute"


def _tokens_digest(h, pairs: list[PreferenceExample]) -> None:
    for pair in pairs:
        for side in (pair.chosen, pair.rejected):
            ids, labels = np.asarray(side.input_ids, np.int64), np.asarray(side.labels, np.int64)
            h.update(np.int64(len(ids)).tobytes() + ids.tobytes() + labels.tobytes())


def _model_identity(model_path: Path) -> list:
    files = sorted(p for p in model_path.iterdir() if p.suffix == ".safetensors")
    return [(model_path / "config.json").read_text(encoding="utf-8"),
            [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]]


def cache_key(config: TrainConfig, model: torch.nn.Module, train: list, evals: list) -> str:
    """The sha256 naming what the numbers depend on (see the module docstring)."""
    reference = "base"
    if config.reference == "adapter":
        folder = Path(config.model.adapter)
        reference = [file_digest(folder / name)[1] for name in (CONFIG_FILE, WEIGHTS_FILE)]
    facts = {"reference": reference, "model": _model_identity(Path(config.model.path)),
             "quant": asdict(config.quant), "compute_dtype": str(getattr(model, "qlora_compute_dtype", "")),
             "loss_chunk_size": config.training.loss_chunk_size, "pairs": [len(train), len(evals)]}
    h = hashlib.sha256(json.dumps(facts, sort_keys=True).encode())
    _tokens_digest(h, train)
    _tokens_digest(h, evals)
    return h.hexdigest()


@torch.no_grad()
def compute(model: torch.nn.Module, pairs: list[PreferenceExample], config: TrainConfig, pad_id: int, desc: str,
            as_training: bool = True) -> torch.Tensor:
    """The reference's summed log-probs of ``pairs`` as ``[n, 2]`` fp32 (chosen, rejected), ``batch_size`` pairs
    per forward in data order, with a progress bar; ``as_training``: with a training step's kernels (for the
    training pairs; evaluation's for the eval pairs, as ``objectives.reference_logps``)."""
    bs, device = config.training.batch_size, next(model.parameters()).device
    out = torch.empty(len(pairs), 2, dtype=torch.float32)  # [n, 2]
    for start in tqdm(range(0, len(pairs), bs), desc=desc, unit="batch", leave=False):
        chunk = pairs[start:start + bs]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id, config.data.max_seq_len).items()}
        logps = reference_logps(model, batch, config.training.loss_chunk_size, as_training).float().cpu()  # [2b]
        out[start:start + len(chunk)] = torch.stack(logps.chunk(2), dim=1)  # [b, 2]
    return out


def load(path: Path, key: str, counts: tuple[int, int]) -> tuple[ReferenceLogps | None, str]:
    """The cache at ``path`` if it is whole and made for ``key``; else None and why (for the log line)."""
    if not path.is_file():
        return None, "no cache yet"
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tables = {split: f.get_tensor(split) for split in SPLITS}
    except (SafetensorError, OSError, ValueError) as e:
        return None, f"{path.name} is unreadable ({str(e)[:60]})"
    if meta.get("format") != FORMAT or meta.get("key") != key:
        return None, f"{path.name} was computed for other data, reference or model (stale)"
    cached = ReferenceLogps(**{s: t.to(torch.float32) for s, t in tables.items()})
    shapes = tuple(tuple(getattr(cached, s).shape) for s in SPLITS)
    if shapes != ((counts[0], 2), (counts[1], 2)) or cached.digest() != meta.get("digest"):
        return None, f"{path.name} is damaged (its numbers do not match the digest in its header)"
    if not all(torch.isfinite(t).all() for t in tables.values()):
        return None, f"{path.name} holds non-finite numbers"
    return cached, "reusing it"


def save(path: Path, cached: ReferenceLogps, key: str) -> None:
    """Write the cache atomically, its key and digest in the header."""
    meta = {"format": FORMAT, "version": str(VERSION), "key": key, "digest": cached.digest()}
    atomic_write_bytes(path, safetensors_bytes({s: getattr(cached, s).contiguous() for s in SPLITS}, meta))


def prepare_reference(run: Run) -> ReferenceLogps | None:
    """DPO's cached reference log-probs for ``run`` (loaded, or computed and written by the main process), or
    None when the objective is not dpo or the reference runs live. Logs which, and why. Every rank computes
    the same numbers (same data, same model), so no rank waits for another's file."""
    config, train, evals = run.config, run.train_set, run.eval_set
    if config.training.objective != "dpo":
        return None
    visits = run.schedule.total_steps * run.schedule.micro_per_step * config.training.batch_size
    cache, why = use_cache(config, visits, len(train) + len(evals))
    if not cache:
        log.info("reference log-probs: live, one no-grad forward per step (%s)", why)
        return None
    path, key = run.out / CACHE_FILE, cache_key(config, run.core, train, evals)
    cached, state = load(path, key, (len(train), len(evals)))
    if cached is not None:
        log.info("reference log-probs: from the cache %s (%s; %s)", path, why, state)
        return cached
    log.info("reference log-probs: computing the cache %s (%s; %s)", path, why, state)
    pad_id = run.tokenizer.pad_token_id
    cached = ReferenceLogps(compute(run.core, train, config, pad_id, "reference (train)"),
                            compute(run.core, evals, config, pad_id, "reference (eval)", as_training=False))
    if run.main:
        save(path, cached, key)
    return cached


def attach(batches: list[dict], indices: list[list[int]], cached: ReferenceLogps | None, split: str) -> list[dict]:
    """Each collated pair batch with its cached ``reference_logps`` ``[2b]`` (unchanged when ``cached`` is None)."""
    if cached is None:
        return batches
    return [{**batch, "reference_logps": cached.rows(split, idx)} for batch, idx in zip(batches, indices)]
