"""Configuration dataclasses, dict <-> dataclass conversion, validation, and ``load_train_config``.

Every field has a default and a comment; the comment doubles as the field's help text. Every numeric field
declares its valid range with ``ranged(default, "[lo, hi]")`` (interval notation: ``(`` and ``)`` exclude the
bound, ``inf`` means any finite number), and ``validate()`` enforces types and ranges of every section, so a
config built in Python gets the same checks as one read from YAML. Unknown keys are errors that list every
unknown key of a file at once, each with the key meant (also names from other tools: ``config_aliases``).
YAML reading (duplicate keys are errors) and ``key=value`` overrides are in ``config_yaml``.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_kit.config_aliases import suggest
from qlora_kit.config_fields import check_fields, coerce, ranged
from qlora_kit.config_yaml import (  # noqa: F401
    ConfigError,
    apply_overrides,
    compose_file,
    key_line,
    line_of,
    load_yaml,
    parse_override,
)
from qlora_kit.dtypes import DTYPES, NAMES
from qlora_kit.optimizers import OPTIMIZER_NAMES


@dataclass
class QuantConfig:
    """How the frozen base model is quantized."""

    bits: int = ranged(4, "[4, 16]")  # 4 (NF4/FP4 through bitsandbytes), 8 (LLM.int8) or 16 (no quantization, plain LoRA)
    quant_type: str = "nf4"  # 4-bit code: "nf4" (normal float, QLoRA) or "fp4"
    double_quant: bool = True  # quantize the per-block absmax scales again to 8 bit (saves ~0.37 bit/param)
    blocksize: int = ranged(64, "[64, 64]")  # weights per absmax scale; transformers quantizes in blocks of 64 only
    quant_storage: str = "uint8"  # storage dtype of packed 4-bit weights; set to the compute dtype for FSDP

    def validate(self, where: str = "quant") -> None:
        """Raise ConfigError for a wrongly typed, out-of-range or impossible setting."""
        check_fields(self, where)
        if self.bits not in (4, 8, 16):
            raise ConfigError(f"{where}.bits: {self.bits} is not supported; use 4, 8 or 16")
        if self.quant_type not in ("nf4", "fp4"):
            raise ConfigError(f"{where}.quant_type: {self.quant_type!r} is unknown; use 'nf4' or 'fp4'")
        if self.quant_storage not in ("uint8", *(d.long for d in DTYPES)):
            raise ConfigError(f"{where}.quant_storage: {self.quant_storage!r}; use uint8, "
                              f"{', '.join(d.long for d in DTYPES)}")


@dataclass
class LoraConfig:
    """Which layers get LoRA adapters, and how the adapters are shaped and initialised."""

    r: int = ranged(16, "[1, 65_536]")  # adapter rank (the maximum rank when dynamic_rank is on)
    alpha: float = ranged(32.0, "(0, inf)")  # scale numerator: the update is (alpha / r) * B @ A (alpha / sqrt(r) with use_rslora)
    dropout: float = ranged(0.0, "[0, 1)")  # dropout on the adapter's input during training
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    init: str = "kaiming"  # A's init: "kaiming" (Kaiming-uniform, as in loralib and PEFT) or "gaussian" (N(0, 1/r)); B is zero
    target_modules: str | list[str] = "all-linear"  # "all-linear", a list of module-name suffixes, or a regex matched against full names
    layers: list[int] | None = ranged(None, "[0, 65_535]")  # decoder layer indices to adapt; None adapts every layer
    modules_to_save: list[str] = field(default_factory=list)  # modules trained in full as a copy, e.g. ["lm_head", "embed_tokens"] after adding tokens
    dynamic_rank: bool = False  # dynamic-rank training (QDyLoRA): sample a rank per step in [r_min, r]
    r_min: int = ranged(1, "[1, 65_536]")  # smallest sampled rank when dynamic_rank is on
    # "log_uniform" draws log(rank) uniformly: as many steps in [1, 4) as in [8, 32), so the small ranks one would
    # deploy are trained alone more often (the first rows of A / columns of B are trained at every step either way)
    rank_sampling: str = "uniform"  # per-step rank distribution in [r_min, r]: "uniform" (DyLoRA, QDyLoRA) or "log_uniform"
    active_rank: int = ranged(0, "[0, 65_536]")  # rank used for evaluation, inference and loading a dynamic adapter; 0 means r

    def validate(self, where: str = "lora") -> None:
        """Raise ConfigError for a wrongly typed, out-of-range or impossible setting."""
        check_fields(self, where)
        if self.init not in ("kaiming", "gaussian"):
            raise ConfigError(f"{where}.init: {self.init!r} is unknown; use 'kaiming' or 'gaussian'")
        if self.dynamic_rank and self.r_min > self.r:
            raise ConfigError(f"{where}.r_min: must be in [1, r={self.r}], got {self.r_min}")
        if self.rank_sampling not in ("uniform", "log_uniform"):
            raise ConfigError(f"{where}.rank_sampling: {self.rank_sampling!r} is unknown; use 'uniform' or 'log_uniform'")
        if self.active_rank > self.r:
            raise ConfigError(f"{where}.active_rank: must be in [1, r={self.r}] (or 0 for r), got {self.active_rank}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError(f"{where}.target_modules: empty list; use 'all-linear' or name modules such as q_proj")

    @property
    def scaling(self) -> float:
        """The multiplier of B @ A at the full rank."""
        return self.alpha / (self.r ** 0.5 if self.use_rslora else self.r)


# ---------------------------------------------------------------------------------------------
# Generic dict <-> dataclass conversion with helpful errors.

class UnknownKeysError(ConfigError):
    """Keys no config section has, all of them at once; ``hints`` pairs each dotted key with its "did you mean"."""

    def __init__(self, hints: list[tuple[str, str]]) -> None:
        self.hints = hints  # (dotted key, hint) for every unknown key, in the order given
        super().__init__(self.describe(lambda key: None))

    def describe(self, line: Callable[[str], int | None]) -> str:
        """The message, with ``line(key)`` (when known) before each key of a multi-key message."""
        if len(self.hints) == 1:
            return f"unknown config key {self.hints[0][0]!r}; {self.hints[0][1]}"
        rows = [f"  {f'line {n}: ' if (n := line(key)) else ''}{key!r}: {hint}" for key, hint in self.hints]
        return f"{len(self.hints)} unknown config keys (rename or remove each):\n" + "\n".join(rows)


@functools.cache
def _key_tree() -> dict[str, list[str]]:
    """Every section of TrainConfig with its keys; ``""`` holds the section names."""
    hints = typing.get_type_hints(TrainConfig)
    sections = {name: [f.name for f in dataclasses.fields(hint)] for name, hint in hints.items()}
    return {"": list(sections), **sections}


def _unknown_keys(cls: type, data: dict, where: str) -> list[tuple[str, str]]:
    """(dotted key, hint) for every key of ``data`` and its sections that ``cls`` does not have."""
    hints, names = typing.get_type_hints(cls), [f.name for f in dataclasses.fields(cls)]
    found = []
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            found.append((path, suggest(path, names, _key_tree())))
        elif dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            found += _unknown_keys(hints[key], value, path)
    return found


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) dict and validate it.

    Raises UnknownKeysError (a ConfigError) listing every unknown key of ``data`` and its sections with the
    key probably meant, else ConfigError for the first wrongly typed or invalid value."""
    unknown = _unknown_keys(cls, data, where)
    if unknown:
        raise UnknownKeysError(unknown)
    hints = typing.get_type_hints(cls)
    obj = cls(**{key: coerce(value, hints[key], f"{where}.{key}" if where else key, from_dict)
                 for key, value in data.items()})
    if hasattr(obj, "validate"):
        obj.validate(where or cls.__name__)
    return obj


def to_dict(obj: Any) -> dict:
    """A plain dict (JSON/YAML-safe) of a dataclass config."""
    return dataclasses.asdict(obj)


@dataclass
class ModelConfig:
    """Which checkpoint to fine-tune and how to run it."""

    path: str = ""  # local Hugging Face checkpoint folder (config.json + safetensors + tokenizer); "demo" = SmolLM2-135M-Instruct
    compute_dtype: str = "auto"  # "auto" (by hardware), "bf16", "fp16" or "fp32"
    device: str = ""  # "cpu", "cuda", "cuda:1"; empty picks the first GPU, else the CPU
    trust_remote_code: bool = False  # run the checkpoint's own Python code (off unless you trust it)
    offload: str = "none"  # frozen 4-bit base: "none"; "disk" (memory-mapped from <output_dir>/.offload, paged in by the OS); "cpu" (host, one layer on the device at a time)
    adapter: str = ""  # PEFT-format adapter folder (ours or PEFT's) whose weights start the training, e.g. an SFT adapter before DPO; empty starts from B = 0

    def validate(self, where: str = "model") -> None:
        """Raise ConfigError for a wrongly typed or unknown setting."""
        check_fields(self, where)
        if self.compute_dtype not in ("auto", *(name for d in DTYPES for name in (d.name, d.long))):
            raise ConfigError(f"{where}.compute_dtype: {self.compute_dtype!r}; use auto, {', '.join(NAMES)}")
        if self.offload not in ("none", "cpu", "disk"):
            raise ConfigError(f"{where}.offload: {self.offload!r}; use none, cpu or disk")


@dataclass
class DataConfig:
    """Where the training data is, what format it has, and how it is cut into batches."""

    train_file: str = ""  # JSONL, JSON, CSV or Parquet file of training records
    eval_file: str = ""  # validation records; empty holds out eval_fraction of train_file instead
    eval_fraction: float = ranged(0.0, "[0, 1)")  # fraction of train_file held out for validation when eval_file is empty
    format: str = "auto"  # "alpaca", "chat", "prompt_completion", "text", "preference" (chosen/rejected pairs), or "auto" (from the first record's fields)
    max_seq_len: int = ranged(512, "[8, 16_777_216]")  # longer examples are truncated (and dropped if no supervised token is left)
    train_on_prompt: bool = False  # also train on prompt/system/user tokens (default: responses only)
    packing: bool = False  # pack several examples into one sequence (no attention across them)
    group_by_length: bool = True  # batch examples of similar length together to save padding
    cache_dir: str = ""  # where tokenized data is cached; empty: <output_dir>/../.token-cache
    system_prompt: str = ""  # optional system message of every record without one (part of the prompt contract)
    chat_template: str = "auto"  # prompt layout: auto (the tokenizer's chat template, else alpaca), alpaca, chatml, llama3, completion, or a .jinja file

    def validate(self, where: str = "data") -> None:
        """Raise ConfigError for a wrongly typed, out-of-range or unknown setting."""
        check_fields(self, where)
        if self.format not in ("auto", "alpaca", "chat", "prompt_completion", "text", "preference"):
            raise ConfigError(f"{where}.format: {self.format!r}; use auto, alpaca, chat, prompt_completion, text "
                              "or preference")


# The experiment trackers training.report_to accepts (accelerate's tracker names) -> the package each one needs.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_trackers(value: list[str] | str, where: str) -> list[str]:
    """``training.report_to`` as a list of tracker names ("none" and "" dropped; a string may list several, comma
    separated). Raises ConfigError for an unknown name or a tracker whose package is not installed."""
    import importlib.util

    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else list(value)
    names = [n for n in dict.fromkeys(names) if n and n != "none"]
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"{where}: unknown tracker {name!r}; use {', '.join(TRACKERS)} or none")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(f"{where}: {name} is not installed; pip install {TRACKERS[name]} (or drop it from "
                              f"{where})")
    return names


@dataclass
class TrainingConfig:
    """The optimisation loop: batches, optimizer, schedule, evaluation, checkpoints and outputs."""

    output_dir: str = "runs/qlora"  # adapter, checkpoints, metrics.jsonl, loss.png and the run summary go here
    epochs: float = ranged(1.0, "[0, 1_000_000]")  # passes over the training data (fractions allowed); max_steps > 0 overrides
    max_steps: int = ranged(0, "[0, 1_000_000_000]")  # optimizer steps to run; 0 derives them from epochs
    batch_size: int = ranged(8, "[1, 65_536]")  # examples per micro-batch
    grad_accum: int = ranged(1, "[1, 65_536]")  # micro-batches per optimizer step (the loss is normalised by supervised tokens across all of them)
    lr: float = ranged(2e-4, "(0, inf)")  # peak learning rate
    weight_decay: float = ranged(0.0, "[0, inf)")  # AdamW weight decay on adapter parameters
    optimizer: str = "paged_adamw_8bit"  # paged_adamw_8bit, paged_adamw_32bit, adamw_8bit or adamw (torch)
    scheduler: str = "cosine"  # cosine, linear or constant, after warmup
    warmup_steps: int = ranged(0, "[0, 1_000_000_000]")  # linear warmup from 0 to lr over these steps
    warmup_ratio: float = ranged(0.0, "[0, 1]")  # warmup as a fraction of all steps (used when warmup_steps is 0)
    max_grad_norm: float = ranged(1.0, "[0, inf)")  # clip the adapter gradients' global norm; 0 disables clipping
    gradient_checkpointing: str = "auto"  # "on", "off", or "auto" (on when the memory plan needs it)
    eval_every: int = ranged(0, "[0, 1_000_000_000]")  # validation loss every N steps; 0 evaluates only at the end
    early_stopping_patience: int = ranged(0, "[0, 1_000_000_000]")  # stop after N evaluations without a better best_metric; 0 never stops early
    eval_generate_every: int = ranged(0, "[0, 1_000_000_000]")  # greedy exact match on held-out records every N steps and at the last (eval_exact_match); 0 never
    eval_generate_samples: int = ranged(100, "[1, 1_000_000_000]")  # how many held-out records (the first N) eval_generate_every scores
    best_metric: str = "eval_loss"  # what picks best_adapter/ and drives early stopping: "eval_loss" (lower is better) or "eval_exact_match" (higher; needs eval_generate_every)
    save_every: int = ranged(0, "[0, 1_000_000_000]")  # checkpoint every N steps; 0 checkpoints only at the end
    keep_checkpoints: int = ranged(2, "[1, 1_000_000]")  # how many recent checkpoints to keep
    on_nonfinite: str = "stop"  # a NaN/inf, diverged or dead step (health.py): "stop", "skip" the step, or "rollback" to the last good checkpoint
    seed: int = ranged(42, "[0, 4_294_967_295]")  # seeds LoRA init, data order, dropout and dynamic-rank sampling
    log_every: int = ranged(1, "[1, 1_000_000_000]")  # write a metrics.jsonl line every N steps
    loss_chunk_size: int = ranged(1024, "[1, 16_777_216]")  # supervised positions per chunk of the vocabulary projection in the loss
    compile: str = "off"  # "on": torch.compile the decoder layers for training; 1.10-1.15x faster steps on the 135M demo model on a CPU after ~1 minute of compiling, no gain measured at 1B (docs/benchmarks.md)
    distributed: str = "ddp"  # with several processes (accelerate launch / torchrun): "ddp" (replicate the 4-bit base) or "fsdp" (shard it; FSDP-QLoRA)
    objective: str = "sft"  # "sft" (next-token loss on the responses), or on preference data (chosen/rejected): "dpo" (against a reference, see dpo_reference) or "orpo" (no reference)
    dpo_beta: float = ranged(0.1, "(0, inf)")  # DPO: how strongly the policy is held near the reference; rewards are dpo_beta * (policy - reference) log-probs
    dpo_loss: str = "sigmoid"  # DPO loss on the reward margin: "sigmoid" (DPO), "ipo" (IPO, on token-normalised log-ratios) or "hinge" (SLiC)
    label_smoothing: float = ranged(0.0, "[0, 0.5)")  # DPO sigmoid: assumed fraction of flipped preference labels (conservative DPO); 0 is plain DPO; ignored by ipo/hinge
    orpo_lambda: float = ranged(0.1, "(0, inf)")  # ORPO: weight of the odds-ratio term added to the NLL of the chosen responses
    dpo_reference: str = "auto"  # DPO reference: "base" (adapters disabled), "adapter" (a frozen copy of model.adapter), "auto" (adapter when model.adapter is set, else base)
    reference_logps: str = "auto"  # DPO reference log-probs: "live" (a no-grad forward every step), "cache" (computed once per example before training, kept in the run folder), "auto" (cache when the run visits every pair at least once)
    report_to: list[str] | str = field(default_factory=list)  # experiment trackers fed the metrics.jsonl numbers: tensorboard, wandb (offline unless WANDB_MODE is set), mlflow (a store in the run folder unless MLFLOW_TRACKING_URI is set), or none; logs go to <output_dir>/tracking

    def validate(self, where: str = "training") -> None:
        """Raise ConfigError for a wrongly typed, out-of-range or unknown setting."""
        check_fields(self, where)
        if self.optimizer not in OPTIMIZER_NAMES:
            raise ConfigError(f"{where}.optimizer: {self.optimizer!r} is unknown; use "
                              f"{', '.join(OPTIMIZER_NAMES[:-1])} or {OPTIMIZER_NAMES[-1]}")
        if self.scheduler not in ("cosine", "linear", "constant"):
            raise ConfigError(f"{where}.scheduler: {self.scheduler!r}; use cosine, linear or constant")
        if self.gradient_checkpointing not in ("on", "off", "auto"):
            raise ConfigError(f"{where}.gradient_checkpointing: {self.gradient_checkpointing!r}; use on, off or auto")
        if self.on_nonfinite not in ("stop", "skip", "rollback"):
            raise ConfigError(f"{where}.on_nonfinite: {self.on_nonfinite!r}; use stop, skip or rollback")
        if self.compile not in ("on", "off"):
            raise ConfigError(f"{where}.compile: {self.compile!r}; use on or off")
        if self.distributed not in ("ddp", "fsdp"):
            raise ConfigError(f"{where}.distributed: {self.distributed!r}; use ddp or fsdp")
        for key, choices in (("objective", ("sft", "dpo", "orpo")), ("dpo_loss", ("sigmoid", "ipo", "hinge")),
                             ("dpo_reference", ("auto", "base", "adapter")), ("reference_logps", ("auto", "live", "cache"))):
            if getattr(self, key) not in choices:
                raise ConfigError(f"{where}.{key}: {getattr(self, key)!r}; use {', '.join(choices)}")
        if self.epochs == 0 and self.max_steps == 0:
            raise ConfigError(f"{where}: set epochs > 0 or max_steps > 0")
        self.report_to = check_trackers(self.report_to, f"{where}.report_to")
        if self.best_metric not in ("eval_loss", "eval_exact_match"):
            raise ConfigError(f"{where}.best_metric: {self.best_metric!r}; use eval_loss or eval_exact_match")
        if self.best_metric == "eval_exact_match" and not self.eval_generate_every:
            raise ConfigError(f"{where}.best_metric=eval_exact_match needs {where}.eval_generate_every > 0 "
                              "(how often to measure it)")
        if self.eval_generate_every and self.objective != "sft":
            raise ConfigError(f"{where}.eval_generate_every: exact match scores single replies; it does not apply "
                              f"to objective={self.objective} (set it to 0)")


@dataclass
class TrainConfig:
    """A whole fine-tune: the YAML file's sections."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the checkpoint and how to run it
    quant: QuantConfig = field(default_factory=QuantConfig)  # how the base is quantized
    lora: LoraConfig = field(default_factory=LoraConfig)  # the adapters
    data: DataConfig = field(default_factory=DataConfig)  # the data and batching
    training: TrainingConfig = field(default_factory=TrainingConfig)  # the optimisation loop

    def validate(self, where: str = "") -> None:
        """Validate every section (types, ranges, choices), then the keys a run needs. Raises ConfigError."""
        check_fields(self, where)
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        if not self.model.path:
            raise ConfigError("model.path: required (a local checkpoint folder, or 'demo')")
        if not self.data.train_file:
            raise ConfigError("data.train_file: required (a JSONL, JSON, CSV or Parquet file)")
        if self.training.compile == "on" and (self.lora.dynamic_rank or self.model.offload != "none"):
            raise ConfigError("training.compile: on cannot compile "
                              f"{'lora.dynamic_rank (a new rank every step)' if self.lora.dynamic_rank else 'model.offload'}"
                              "; set training.compile: off")
        tc = self.training
        if tc.compile == "on" and tc.objective == "dpo":
            raise ConfigError("training.compile: on cannot compile objective=dpo (its no-grad reference forward must "
                              "round exactly as the policy's training forward); set training.compile: off")
        for key, value in (("dpo_reference", "adapter"), ("reference_logps", "cache")):
            if getattr(tc, key) == value and tc.objective != "dpo":
                raise ConfigError(f"training.{key}={value}: only DPO has a reference (training.objective={tc.objective}); "
                                  f"set training.objective=dpo or leave {key} at auto")
        if self.training.dpo_reference == "adapter" and not self.model.adapter:
            raise ConfigError("training.dpo_reference=adapter: needs model.adapter (the adapter whose frozen copy is "
                              "the reference); set model.adapter or use dpo_reference=base")

    @property
    def reference(self) -> str:
        """What DPO compares against: "adapter" (the frozen starting adapter) or "base" (adapters disabled)."""
        choice = self.training.dpo_reference
        return choice if choice != "auto" else ("adapter" if self.model.adapter else "base")


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None,
                      resolve_model: Callable[[str], Path] | None = None) -> TrainConfig:
    """Read a YAML config (optional), apply ``key=value`` overrides, and validate it.

    ``resolve_model`` turns ``model.path`` into a folder (the CLI passes ``demo.model.resolve_model_path``: "demo"
    becomes the cached demo model; this layer cannot import the demo); without it the path stays as written.
    Raises ConfigError naming the file, the line and the key (every unknown key at once) and the fix."""
    data = load_yaml(path) if path else {}
    try:
        apply_overrides(data, overrides or [])
        config = from_dict(TrainConfig, data)
    except ConfigError as e:
        if not path:
            raise
        overridden = {o.split("=", 1)[0].strip() for o in overrides or []}
        if isinstance(e, UnknownKeysError) and len(e.hints) > 1:
            root = compose_file(Path(path))
            message = e.describe(lambda key: None if key in overridden else line_of(root, key))
            raise ConfigError(f"{path}: {message}") from None
        line = key_line(Path(path), str(e), overridden)
        raise ConfigError(f"{path}{f' line {line}' if line else ''}: {e}") from None
    if resolve_model is not None and config.model.path:
        config.model.path = str(resolve_model(config.model.path))
    return config
