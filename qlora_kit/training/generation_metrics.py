"""Generation metrics during training (``training.eval_generate_every``) and the choice of the best adapter.

``held_out_exact_match`` scores greedy exact match on the first ``training.eval_generate_samples`` held-out
records with ``inference.evaluate.evaluate``, the code ``qlora-kit eval`` runs: each record is rendered through
the run's prompt contract, generated in memory-sized batches and compared with its reply. ``update_best``
keeps the best values seen and, by ``training.best_metric``, the best step (its adapter is ``best_adapter/``)
and the evaluations since it (early stopping).
"""
from __future__ import annotations

from qlora_kit.config import ConfigError, TrainConfig
from qlora_kit.data.prepare import held_out_records
from qlora_kit.inference.evaluate import eval_cases, evaluate
from qlora_kit.training.run import Run

LOWER_IS_BETTER = {"eval_loss": True, "eval_exact_match": False}  # the values training.best_metric may name


def generation_records(config: TrainConfig, tokenizer) -> list[dict]:
    """The held-out records ``training.eval_generate_every`` scores (the first ``eval_generate_samples``);
    empty when it is off. Renders each once through the tokenizer's prompt contract, so a record without a
    reply (or a ``text`` record) is a DataError naming it before any weight is loaded; ConfigError when there
    is no held-out record."""
    tc = config.training
    if not tc.eval_generate_every:
        return []
    records = held_out_records(config.data, tc.seed)[: tc.eval_generate_samples]
    if not records:
        raise ConfigError("training.eval_generate_every: no held-out records to score; set data.eval_file or "
                          "data.eval_fraction")
    eval_cases(tokenizer, records, config.data.format, data_config=config.data)
    return records


def held_out_exact_match(run: Run) -> float:
    """Greedy exact match of the model as it is now on ``run.eval_records`` (mode and rank restored after)."""
    result = evaluate(run.core, run.tokenizer, run.eval_records, metric="exact_match", max_new_tokens=None,
                      fmt=run.config.data.format, data_config=run.config.data, loss=False, progress=False)
    return result.score


def update_best(run: Run, measured: dict[str, float]) -> bool | None:
    """Record an evaluation's values (``eval_loss`` and/or ``eval_exact_match``) in ``run.progress``: the best of
    each seen so far and, for ``training.best_metric``, the best step and the evaluations since it.

    Returns whether ``best_metric`` improved (the caller then saves ``best_adapter/``); None when this
    evaluation did not measure it.
    """
    p, metric = run.progress, run.config.training.best_metric
    previous = p.best_eval_loss if metric == "eval_loss" else p.best_exact_match
    if "eval_loss" in measured:
        p.best_eval_loss = min(p.best_eval_loss, measured["eval_loss"]) if p.best_eval_loss is not None \
            else measured["eval_loss"]
    if "eval_exact_match" in measured:
        p.best_exact_match = max(p.best_exact_match, measured["eval_exact_match"]) \
            if p.best_exact_match is not None else measured["eval_exact_match"]
    if metric not in measured:
        return None
    value = measured[metric]
    better = previous is None or (value < previous if LOWER_IS_BETTER[metric] else value > previous)
    if better:
        p.best_step, p.bad_evals = p.done, 0
    else:
        p.bad_evals += 1
    return better
