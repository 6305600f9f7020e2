"""The demo's preference task: the demo's CSV records, where the preferred answer writes the city in UPPER CASE.

Each pair answers one demo prompt (``demo.task``: a free-text person record -> ``last,first,YYYY-MM-DD,city``).
``rejected`` is the answer the demo's SFT adapter was trained to give (``Lopez,Maria,1987-03-05,Lyon``);
``chosen`` is the same line with the city in capitals (``Lopez,Maria,1987-03-05,LYON``). The instruction does not
ask for capitals: the preference is learned from the pairs alone, so neither the base model nor the SFT adapter
follows the rule before preference tuning. The pairs are generated deterministically from a seed of their own
(``PREFERENCE_SEED``), so their held-out set is new to the SFT adapter too.

``measure`` scores a model (its active adapters) on held-out pairs: preference accuracy from the policy's own
log-probs (chosen above rejected), the implicit-reward accuracy against a reference adapter (DPO's), and
greedy generations: the fraction that follow the rule, equal the chosen answer, or equal the rejected one.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from qlora_kit.atomic import atomic_write_bytes
from qlora_kit.config import ConfigError, DataConfig, LoraConfig, ModelConfig, TrainConfig, TrainingConfig
from qlora_kit.data.batching import collate_pairs
from qlora_kit.data.prepare import prepare_data
from qlora_kit.demo.task import make_demo_dataset, user_content
from qlora_kit.inference.evaluate import evaluate, exact_match_one, normalize_answer
from qlora_kit.model.adapters import read_adapter
from qlora_kit.model.lora import adapters_active
from qlora_kit.training.objectives import sequence_logps

PREFERENCE_SEED = 20  # the pairs' own seed (the SFT demo uses 0): other people, other sentences
FIELDS = 4  # last_name, first_name, birth_date, city


def upper_city(line: str) -> str:
    """The demo's CSV line with its last field (the city) in capitals: the chosen answer."""
    head, _, city = line.rpartition(",")
    return f"{head},{city.upper()}"


def follows_rule(text: str) -> bool:
    """A four-field CSV line whose city (the last field) has letters, all of them capitals."""
    fields = normalize_answer(text).split(",")
    city = fields[-1].strip()
    return len(fields) == FIELDS and any(c.isalpha() for c in city) and city == city.upper()


def preference_pairs(records: list[dict]) -> list[dict]:
    """Demo records (alpaca) as preference records: the same user prompt, chosen = city in capitals,
    rejected = the SFT answer."""
    return [{"prompt": user_content(r), "chosen": upper_city(r["output"]), "rejected": r["output"]} for r in records]


def make_preference_dataset(n_train: int = 160, n_eval: int = 100, seed: int = PREFERENCE_SEED
                            ) -> tuple[list[dict], list[dict]]:
    """Training and held-out preference records (``prompt``, ``chosen``, ``rejected``); no person is in both.
    Deterministic in the arguments; raises ValueError as ``make_demo_dataset`` does."""
    train, held_out = make_demo_dataset(n_train, n_eval, seed)
    return preference_pairs(train), preference_pairs(held_out)


def write_preference_dataset(out_dir: str | Path, n_train: int = 160, n_eval: int = 100,
                             seed: int = PREFERENCE_SEED) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` of ``make_preference_dataset`` into ``out_dir``, atomically."""
    out_dir = Path(out_dir)
    paths = (out_dir / "train.jsonl", out_dir / "eval.jsonl")
    for path, records in zip(paths, make_preference_dataset(n_train, n_eval, seed)):
        atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
    return paths


def preference_config(model_path: str | Path, train_file: Path, eval_file: Path | None, out: Path,
                      sft_adapter: str | Path | None, training: dict, compute_dtype: str = "auto") -> TrainConfig:
    """The demo's DPO run: from ``sft_adapter`` (``model.adapter``; its own LoRA shape) or, when None, from
    the base with a fresh r=16 all-linear adapter; ``eval_file`` None: no validation; ``training`` sets TrainingConfig fields (objective, beta,
    lr, batch, steps...). Raises ConfigError when ``sft_adapter`` is given but this qlora-kit has no
    ``model.adapter`` setting to start from it."""
    model = ModelConfig(path=str(model_path), compute_dtype=compute_dtype)
    lora = None
    if sft_adapter is not None:
        if "adapter" not in {f.name for f in dataclasses.fields(ModelConfig)}:
            raise ConfigError(f"--sft-adapter {sft_adapter}: this qlora-kit has no model.adapter setting, so DPO "
                              "cannot start from the SFT adapter; update qlora-kit (issue 20), or pass --from-base "
                              "to train from the base model")
        model.adapter = str(sft_adapter)
        lora = dataclasses.replace(read_adapter(sft_adapter).config, dropout=0.0)
    return TrainConfig(model=model, lora=lora or LoraConfig(r=16, alpha=32.0),
                       data=DataConfig(train_file=str(train_file), eval_file=str(eval_file or ""), max_seq_len=256),
                       training=TrainingConfig(output_dir=str(out), **training))


@torch.no_grad()
def pair_logps(model: nn.Module, tokenizer, pairs: list[dict], batch_size: int = 8, max_seq_len: int = 256
               ) -> torch.Tensor:
    """Summed log-probability of each pair's chosen and rejected response under the model's active adapters,
    ``[n, 2]`` (fp32), rendered and tokenized as training does, in eval mode (restored after)."""
    examples, _, _ = prepare_data(DataConfig(format="preference", max_seq_len=max_seq_len), tokenizer, records=pairs)
    was_training = model.training
    model.eval()
    out = []
    for k in range(0, len(examples), batch_size):
        batch = collate_pairs(examples[k:k + batch_size], tokenizer.pad_token_id, max_seq_len)
        sums, _ = sequence_logps(model, batch)  # [2b]: chosen rows, then rejected rows
        out.append(torch.stack(sums.chunk(2), dim=1))  # [b, 2]
    model.train(was_training)
    return torch.cat(out)


def measure(model: nn.Module, tokenizer, pairs: list[dict], reference: list[str] | None = None,
            max_new_tokens: int = 32, batch_size: int | None = None) -> dict:
    """Score the model's active adapters on held-out preference ``pairs``.

    Returns ``pref_accuracy`` (policy log-prob of chosen > rejected) and ``logp_margin`` (its mean difference,
    nats), with ``reference`` (the adapter names applied for the reference; ``[]`` the base) also
    ``reward_accuracy`` and ``reward_margin`` (DPO's implicit reward, per unit beta), and from greedy generations
    ``follows_rule``, ``exact_match_chosen`` and ``exact_match_rejected`` (fractions), plus ``examples`` (the
    first five prompts' predictions).
    """
    policy = pair_logps(model, tokenizer, pairs)  # [n, 2]
    margin = policy[:, 0] - policy[:, 1]  # [n]
    out = {"pairs": len(pairs), "pref_accuracy": (margin > 0).float().mean().item(), "logp_margin": margin.mean().item()}
    if reference is not None:
        with adapters_active(model, reference):
            ref = pair_logps(model, tokenizer, pairs)  # [n, 2]
        rewards = policy - ref  # [n, 2] log pi/ref
        gap = rewards[:, 0] - rewards[:, 1]
        out.update(reward_accuracy=(gap > 0).float().mean().item(), reward_margin=gap.mean().item())
    records = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
    result = evaluate(model, tokenizer, records, max_new_tokens=max_new_tokens, batch_size=batch_size, loss=False)
    predictions = [ex.prediction for ex in result.examples]
    n = len(pairs)
    out.update(follows_rule=sum(map(follows_rule, predictions)) / n,
               exact_match_chosen=sum(map(exact_match_one, predictions, (p["chosen"] for p in pairs))) / n,
               exact_match_rejected=sum(map(exact_match_one, predictions, (p["rejected"] for p in pairs))) / n,
               generate_seconds=round(result.generate_seconds, 1),
               examples=[{"chosen": p["chosen"], "prediction": x} for p, x in zip(pairs[:5], predictions)])
    return out
