"""Validate a run before spending anything on it: config, model folder, LoRA targets, every data record.

``validate_run`` is the one validation path: ``qlora-kit validate`` prints its report, and ``train()`` calls
it before loading the model and trains on the data it prepared. Nothing here reads a weight: the model
folder is checked from its config.json and file names, the LoRA targets are resolved against the model's
module tree built on the ``meta`` device (no memory, no weights), and the data is tokenized with the
tokenizer only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from qlora_kit.config import ConfigError, TrainConfig
from qlora_kit.data.contract import prompt_contract
from qlora_kit.data.preference import PreferenceExample
from qlora_kit.data.prepare import DataStats, prepare_data
from qlora_kit.data.tokenize import Example
from qlora_kit.planning.fit import check_fits
from qlora_kit.training.generation_metrics import generation_records
from qlora_kit.training.start_adapter import start_config

log = logging.getLogger("qlora_kit")


@dataclass
class ValidationReport:
    """What ``validate_run`` checked and found; ``train()`` reuses the tokenizer and the prepared data."""

    config: TrainConfig
    model_path: Path  # the checkpoint folder (config.model.path; the CLI resolved "demo" when it loaded the config)
    model_type: str  # config.json's model_type
    targets: list[str] | None  # full names of the layers LoRA will wrap (None: architecture not buildable here)
    stats: DataStats  # counts and token lengths of the prepared data
    tokenizer: Any = field(repr=False, default=None)
    train_set: list[Example] = field(repr=False, default_factory=list)
    eval_set: list[Example] = field(repr=False, default_factory=list)
    eval_records: list[dict] = field(repr=False, default_factory=list)  # scored by training.eval_generate_every

    @property
    def truncated_fraction(self) -> float:
        """Examples cut to ``data.max_seq_len`` / records read."""
        return self.stats.truncated / max(self.stats.records, 1)

    @property
    def supervised_fraction(self) -> float:
        """Training tokens that are loss targets / all training tokens."""
        return self.stats.supervised_tokens / max(self.stats.tokens, 1)

    def summary(self) -> str:
        """A few lines for the terminal."""
        s, data = self.stats, self.config.data
        if self.targets is None:
            targets = "targets checked when the model loads"
        else:
            kinds = sorted({t.rsplit(".", 1)[-1] for t in self.targets})
            targets = f"{len(self.targets)} layers ({', '.join(kinds)})"
        return "\n".join([
            f"model: {self.model_path} ({self.model_type}); LoRA r={self.config.lora.r} on {targets}",
            f"data: {s.records} records -> {s.examples} train / {s.eval_examples} eval examples, "
            f"{s.dropped} dropped (no supervised token left)",
            f"token length p50/p90/p99/max: {s.len_p50}/{s.len_p90}/{s.len_p99}/{s.len_max} "
            f"(data.max_seq_len={data.max_seq_len})",
            f"truncated: {100 * self.truncated_fraction:.1f}% of examples ({s.truncated} of {s.records})",
            f"supervised: {100 * self.supervised_fraction:.1f}% of training tokens "
            f"({s.supervised_tokens:,} of {s.tokens:,})",
            prompt_contract(self.tokenizer, data).describe(),
        ] + ([f"generation metric: exact match on {len(self.eval_records)} held-out records every "
              f"{self.config.training.eval_generate_every} steps and at the end"] if self.eval_records else []))


def token_cache_dir(config: TrainConfig) -> Path:
    """Where tokenized data is cached: ``data.cache_dir``, else ``<output_dir>/../.token-cache``."""
    if config.data.cache_dir:
        return Path(config.data.cache_dir)
    return Path(config.training.output_dir).parent / ".token-cache"


def model_skeleton(model_path: Path, config: TrainConfig) -> nn.Module | None:
    """The model's module tree built on the meta device (no memory, no weights), or None (with a log line) when
    transformers cannot build the architecture without its weights; the checks then happen at load time."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    remote = config.model.trust_remote_code
    try:
        hf_config = AutoConfig.from_pretrained(str(model_path), trust_remote_code=remote)
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(hf_config, trust_remote_code=remote)
    except Exception as e:  # an architecture this transformers cannot build: defer to load_model's errors
        log.warning("validate: cannot build %s without weights (%s); LoRA targets are checked at load time",
                    model_path, e)
        return None


def check_targets(skeleton: nn.Module | None, config: TrainConfig) -> list[str] | None:
    """The layers ``config.lora`` selects on the model's meta-device skeleton (``model_skeleton``); None without
    a skeleton. Raises ConfigError (from ``lora.resolve_targets``) when the targets match nothing."""
    from qlora_kit.model.lora import resolve_targets

    return None if skeleton is None else resolve_targets(skeleton, config.lora)


def load_tokenizer(model_path: Path, trust_remote_code: bool = False):
    """The checkpoint's tokenizer, with the EOS token as padding when it has no pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_objective(config: TrainConfig, train_set: list) -> bool:
    """Whether the data is preference pairs; raises ConfigError unless ``training.objective`` fits it (sft on
    single examples, dpo/orpo on pairs without packing or FSDP)."""
    tc, paired = config.training, bool(train_set) and isinstance(train_set[0], PreferenceExample)
    if paired != (tc.objective != "sft"):
        fix = ("preference records (chosen/rejected); set training.objective to dpo or orpo" if paired else
               "single-response records; give prompt/chosen/rejected records or set training.objective=sft")
        raise ConfigError(f"training.objective={tc.objective}, but data.train_file holds {fix}")
    if paired and config.data.packing:
        raise ConfigError(f"data.packing: training.objective={tc.objective} compares whole sequences (chosen vs "
                          "rejected), which packing would merge; set data.packing=false")
    if paired and tc.distributed == "fsdp":
        raise ConfigError(f"training.distributed=fsdp does not support objective={tc.objective} yet; use ddp")
    return paired


def validate_run(config: TrainConfig, tokenizer=None, force: bool = False) -> ValidationReport:
    """Check everything a run needs before any weight is loaded, in this order.

    1. the config's values (``TrainConfig.validate``), 2. the model folder is a causal-LM checkpoint with
    safetensors weights (``model.check_model_path``), 3. the LoRA targets match layers of that architecture,
    4. every data record parses, has its format's fields with the right types, and leaves at least one
    example with a supervised token after truncation (``data.prepare_data``, tokenizer only), and with
    ``training.eval_generate_every`` every scored held-out record renders a prompt and a reply, 5. the memory
    plan fits: a run needing more than 1.5x the available memory is refused (``fit_check.check_fits``).

    Args:
        config: the run's config.
        tokenizer: an already loaded tokenizer (default: the checkpoint's).
        force: run the memory check but do not refuse (``--force``).
    Returns:
        A ValidationReport with the data summary, the tokenizer and the prepared train/eval examples.
    Raises:
        ConfigError or DataError naming the file, line or key, and the fix.
    """
    from qlora_kit.model.load import check_model_path

    config.validate()
    model_path = Path(config.model.path)
    hf_config = check_model_path(model_path, config.model.trust_remote_code)
    skeleton = model_skeleton(model_path, config)
    if config.model.adapter:  # the run trains the adapter's layers at its rank: a copy of config with them
        config = start_config(config, skeleton)
    targets = check_targets(skeleton, config)
    if tokenizer is None:
        tokenizer = load_tokenizer(model_path, config.model.trust_remote_code)
    train_set, eval_set, stats = prepare_data(config.data, tokenizer, cache_dir=token_cache_dir(config),
                                              seed=config.training.seed)
    check_objective(config, train_set)
    eval_records = generation_records(config, tokenizer)  # rendered once: a record without a reply fails here
    longest = config.data.max_seq_len if config.data.packing else min(stats.len_max, config.data.max_seq_len)
    check_fits(config, model_path, longest, targets, force)
    return ValidationReport(config, model_path, str(hf_config.get("model_type")), targets, stats, tokenizer,
                            train_set, eval_set, eval_records)
