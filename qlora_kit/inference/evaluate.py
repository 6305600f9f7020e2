"""Score a model (with its active adapters) on held-out records: a generation metric, loss, speed.

``evaluate`` reads records in any format the trainer reads, prompts the model exactly as training rendered
the text before each reply (``inference.prompts.record_prompt``), generates in memory-sized batches and
scores each prediction against the record's reply with one of ``METRICS``. It also reports the mean loss per
response token (training's validation loss) and tokens/s; ``baseline=True`` scores the base model too
(the same loaded model with its adapters disabled).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qlora_kit.atomic import atomic_write_bytes
from qlora_kit.config import ConfigError, DataConfig
from qlora_kit.data import DataError
from qlora_kit.data.formats import detect_format
from qlora_kit.data.prepare import prepare_data
from qlora_kit.data.sources import load_records
from qlora_kit.inference.generate import generate_tokens
from qlora_kit.inference.prompts import Prompt, record_prompt
from qlora_kit.model.lora import adapters_disabled
from qlora_kit.training.evaluate import evaluate_loss

# max_new_tokens=None: the longest reply in tokens plus this room (a trailing period or newline, the end token,
# another tokenization of the same text); an output longer than that cannot match its reference anyway
REPLY_SLACK = 8
_TRAILING = re.compile(r"[.\s]+\Z")
_FENCE = re.compile(r"\A```[a-zA-Z]*\n(.*)\n```\Z", re.S)


def normalize_answer(text: str) -> str:
    """What exact match compares: the text without surrounding whitespace and trailing periods.

    Deliberately strict otherwise: case, inner spacing, quoting, code fences and extra lines all count.
    Idempotent: ``normalize_answer(normalize_answer(t)) == normalize_answer(t)``.
    """
    return _TRAILING.sub("", text).strip()


def exact_match_one(prediction: str, reference: str) -> bool:
    """Equal after ``normalize_answer``."""
    return normalize_answer(prediction) == normalize_answer(reference)


def contains_one(prediction: str, reference: str) -> bool:
    """The normalized reference occurs in the prediction."""
    return normalize_answer(reference) in prediction


def _json_value(text: str):
    text = text.strip()
    fenced = _FENCE.match(text)
    return json.loads(fenced.group(1) if fenced else text)


def json_match_one(prediction: str, reference: str) -> bool:
    """Both parse as JSON (a ```json fence around the prediction allowed) to equal values.

    A reference that is not JSON falls back to exact match.
    """
    try:
        want = _json_value(reference)
    except ValueError:
        return exact_match_one(prediction, reference)
    try:
        return _json_value(prediction) == want
    except ValueError:
        return False


METRICS: dict[str, Callable[[str, str], bool] | None] = {  # metric name -> per-example test (loss: none)
    "exact_match": exact_match_one,
    "json_match": json_match_one,
    "contains": contains_one,
    "loss": None,
}


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference after ``normalize_answer`` (0.0 for no examples)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    return sum(map(exact_match_one, predictions, references)) / len(references)


@dataclass
class EvalExample:
    """One record's prompt, reply and prediction."""

    prompt: str  # the model's input text, as training rendered it
    reference: str  # the record's reply
    prediction: str | None = None  # the generated text (None for metric "loss")
    correct: bool | None = None  # the metric's verdict (None for metric "loss")


@dataclass
class EvalResult:
    """What ``evaluate`` measured."""

    metric: str  # one of METRICS
    score: float | None  # fraction of examples the metric counts correct (None for "loss")
    loss: float | None  # mean cross-entropy per response token (None when not computed)
    examples: list[EvalExample] = field(default_factory=list)
    generated_tokens: int = 0  # new tokens, up to each first end-of-sequence token
    generate_seconds: float = 0.0  # wall time of generation
    batch_size: int = 0  # prompts per generation batch
    baseline: EvalResult | None = None  # the base model with adapters disabled, when asked for

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of generation."""
        return self.generated_tokens / self.generate_seconds if self.generate_seconds else 0.0

    def summary(self) -> dict:
        """The numbers, without the per-example rows (JSON-safe)."""
        out = {
            "metric": self.metric,
            "score": self.score,
            "loss": self.loss,
            "examples": len(self.examples),
            "generated_tokens": self.generated_tokens,
            "generate_seconds": round(self.generate_seconds, 2),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "batch_size": self.batch_size,
        }
        return out | ({"baseline": self.baseline.summary()} if self.baseline else {})


def read_eval_records(data: str | Path | list[dict], limit: int | None = None) -> list[dict]:
    """The records of a file (any format the trainer reads) or a list, the first ``limit`` of them."""
    records = load_records(data) if isinstance(data, (str, Path)) else list(data)
    if not records:
        raise DataError(f"{data if isinstance(data, (str, Path)) else 'records'}: no records to evaluate")
    return records[:limit] if limit else records


def eval_cases(
    tokenizer, records: list[dict], fmt: str = "auto", system: str | None = None,
    data_config: DataConfig | None = None,
) -> tuple[list[Prompt], list[EvalExample]]:
    """The rendered prompt (``inference.prompts.record_prompt``, with ``data_config``'s prompt contract when given) and
    the reference of every record; DataError naming the record for one without a reply."""
    fmt = detect_format(records[0], "record 1") if fmt == "auto" else fmt
    prompts, examples = [], []
    for i, record in enumerate(records, 1):
        prompt, reference = record_prompt(tokenizer, record, fmt, system, where=f"record {i}", data_config=data_config)
        if reference is None:
            raise DataError(
                f"record {i}: no reply to compare the prediction with (a chat record must end with "
                "an assistant turn)"
            )
        prompts.append(prompt)
        examples.append(EvalExample(prompt.text, reference))
    return prompts, examples


def _loss(
    model, tokenizer, records: list[dict], fmt: str, settings: dict, batch_size: int, progress: bool = False
) -> float:
    data_config, max_seq_len = settings["data_config"], settings["max_seq_len"]
    cfg = DataConfig(system_prompt=settings["system"] or "") if data_config is None else data_config
    cfg = dataclasses.replace(cfg, format=fmt, max_seq_len=max_seq_len, train_file="", eval_file="",
                              eval_fraction=0.0, cache_dir="")  # these records only, never cached
    examples, _, _ = prepare_data(cfg, tokenizer, records=records)
    return evaluate_loss(model, examples, batch_size, tokenizer.pad_token_id, max_seq_len, progress=progress)


def reply_tokens(tokenizer, examples: list[EvalExample]) -> int:
    """Tokens of the longest reference (without special tokens)."""
    return max(len(tokenizer(ex.reference, add_special_tokens=False)["input_ids"]) for ex in examples)


def _score(model, tokenizer, records: list[dict], metric: str, settings: dict) -> EvalResult:
    """One pass over the records with the model's adapters as they are."""
    fmt, system = settings["fmt"], settings["system"]
    result = EvalResult(metric=metric, score=None, loss=None)
    if metric != "loss":
        prompts, result.examples = eval_cases(tokenizer, records, fmt, system, settings["data_config"])
        gen = generate_tokens(
            model,
            tokenizer,
            prompts,
            settings["max_new_tokens"] or reply_tokens(tokenizer, result.examples) + REPLY_SLACK,
            settings["batch_size"],
            progress=settings["progress"],
        )
        test = METRICS[metric]
        for ex, text in zip(result.examples, tokenizer.batch_decode(gen.tokens, skip_special_tokens=True)):
            ex.prediction = text.strip()
            ex.correct = test(ex.prediction, ex.reference)
        result.score = sum(ex.correct for ex in result.examples) / len(result.examples)
        result.generated_tokens, result.generate_seconds = gen.n_tokens, gen.seconds
        result.batch_size = gen.batch_size
    if settings["loss"]:
        result.loss = _loss(
            model, tokenizer, records, fmt, settings, result.batch_size or settings["batch_size"] or 8,
            settings["progress"],
        )
    return result


def evaluate(
    model,
    tokenizer,
    data: str | Path | list[dict],
    metric: str = "exact_match",
    max_new_tokens: int | None = 64,
    batch_size: int | None = None,
    fmt: str = "auto",
    system: str | None = None,
    loss: bool = True,
    max_seq_len: int = 2048,
    baseline: bool = False,
    limit: int | None = None,
    progress: bool = False,
    data_config: DataConfig | None = None,
) -> EvalResult:
    """Score ``model`` (its active adapters applied) on held-out records.

    Args:
        data: a records file (.jsonl/.json/.csv/.parquet, any training format) or a list of record dicts.
        metric: ``exact_match``, ``json_match``, ``contains`` (greedy generation scored against each reply),
            or ``loss`` (no generation).
        max_new_tokens / batch_size: generation length (None: the longest reply in tokens + ``REPLY_SLACK``);
            prompts per batch (None: chosen from memory).
        fmt / system: the records' format (``auto`` detects it) and training's system prompt, if any.
        loss: also compute the mean loss per response token (over at most ``max_seq_len`` tokens each).
        baseline: also score the base model (adapters disabled on this same model) into ``.baseline``.
        limit: only the first ``limit`` records. progress: progress bars with ETA.
        data_config: a training run's data settings: its prompt contract renders the records (training's
            generation metrics pass theirs); default: the tokenizer's contract as it is, with ``system``.
    Returns:
        An EvalResult with the score, loss, speed and one EvalExample per record.
    Raises:
        ConfigError for an unknown metric; DataError naming the record for unusable data.
    """
    if metric not in METRICS:
        raise ConfigError(f"metric {metric!r}: use one of {', '.join(METRICS)}")
    records = read_eval_records(data, limit)
    settings = {
        "fmt": fmt,
        "system": system,
        "data_config": data_config,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "progress": progress,
        "loss": loss or metric == "loss",
        "max_seq_len": max_seq_len,
    }
    result = _score(model, tokenizer, records, metric, settings)
    if baseline:
        with adapters_disabled(model):
            result.baseline = _score(
                model, tokenizer, records, metric, settings | {"batch_size": result.batch_size or batch_size}
            )
    return result


def write_predictions(result: EvalResult, out: str | Path) -> Path:
    """One JSON line per example (prompt, reference, prediction, correct; the base model's too); atomic."""
    base = result.baseline.examples if result.baseline else [None] * len(result.examples)
    lines = []
    for ex, b in zip(result.examples, base):
        row = {
            "prompt": ex.prompt,
            "reference": ex.reference,
            "prediction": ex.prediction,
            "correct": ex.correct,
        }
        if b is not None:
            row |= {"base_prediction": b.prediction, "base_correct": b.correct}
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write_bytes(out, "".join(lines).encode("utf-8"))
    return Path(out)
