"""Preference objectives, DPO and ORPO, on batches of (chosen, rejected) pairs.

A batch from ``data.batching.collate_pairs`` holds the chosen sides in rows ``[0, b)`` and the rejected sides in
rows ``[b, 2b)``, so both go through ONE forward. Each row's response log-probability is summed over its
supervised positions only, through ``loss.token_log_probs`` (chunked: no ``[rows, s, V]`` logits).

- DPO (Rafailov et al. 2023): rewards ``beta * (log pi(y|x) - log ref(y|x))``; the reference is the same
  model with its adapters disabled (the frozen 4-bit base) or with the frozen copy of the starting adapter
  (``model/reference.py``), run under ``torch.no_grad``: no second model. Its log-probs may come precomputed
  in the batch (``training/reference_cache.py``).
  ``dpo_loss`` "sigmoid": ``-(1-eps) log s(beta*d) - eps log s(-beta*d)`` with ``d`` the reward margin over beta
  and eps = ``label_smoothing``; "ipo": ``(d_norm - 1/(2 beta))^2`` on token-normalised log-ratios (as TRL);
  "hinge": ``relu(1 - beta*d)``.
- ORPO (Hong et al. 2024): the NLL of the chosen responses (per token) minus ``orpo_lambda * log s(log odds)``,
  the odds taken on token-normalised log-probs; no reference. Rewards are ``orpo_lambda`` x those log-probs.

Gradient accumulation: a micro-batch's loss is divided by the totals of the whole optimizer step
(``StepTotals``), so k micro-batches give the gradient of one big batch, as for SFT.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qlora_kit.config import TrainingConfig
from qlora_kit.data import IGNORE_INDEX
from qlora_kit.model.attention import training_kernels
from qlora_kit.model.reference import reference
from qlora_kit.training.loss import backbone_hidden, head_kwargs, token_log_probs


@dataclass
class StepTotals:
    """What one optimizer step's losses are divided by, counted over all its micro-batches (all ranks)."""

    pairs: int  # preference pairs in the step
    chosen_tokens: int  # supervised tokens of the chosen responses (ORPO's NLL is per token)

    @classmethod
    def of(cls, batches: list[dict]) -> StepTotals:
        """The totals of collated pair batches (chosen rows first in each)."""
        pairs = sum(b["labels"].shape[0] // 2 for b in batches)
        chosen = sum(int((b["labels"][: b["labels"].shape[0] // 2, 1:] != IGNORE_INDEX).sum()) for b in batches)
        return cls(pairs, chosen)


@dataclass
class PairStats:
    """Sums over pairs for the metrics; ``add`` them over micro-batches, then read ``means``."""

    pairs: int = 0  # pairs seen
    reward_chosen: float = 0.0  # sum of the chosen responses' rewards
    reward_rejected: float = 0.0  # sum of the rejected responses' rewards
    correct: float = 0.0  # pairs whose chosen reward is above the rejected one

    def add(self, other: PairStats) -> PairStats:
        """The element-wise sum of two stats."""
        return PairStats(self.pairs + other.pairs, self.reward_chosen + other.reward_chosen,
                         self.reward_rejected + other.reward_rejected, self.correct + other.correct)

    def means(self) -> dict[str, float]:
        """``reward_chosen``, ``reward_rejected``, ``reward_margin`` and ``pref_accuracy``, averaged over pairs."""
        n = max(self.pairs, 1)
        return {"reward_chosen": self.reward_chosen / n, "reward_rejected": self.reward_rejected / n,
                "reward_margin": (self.reward_chosen - self.reward_rejected) / n, "pref_accuracy": self.correct / n}


def sequence_logps(model: nn.Module, batch: dict, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's supervised tokens ``[rows]`` (fp32) and their count ``[rows]``."""
    hidden, labels = backbone_hidden(model, batch)  # [rows, s, h], [rows, s]
    logps, mask = token_log_probs(hidden, labels, chunk_size=chunk_size, **head_kwargs(model))  # [n], [rows, s-1]
    row = mask.nonzero(as_tuple=True)[0]  # [n] the row of each supervised token
    sums = logps.new_zeros(mask.shape[0]).index_add(0, row, logps)  # [rows]
    return sums, mask.sum(dim=1)


def reference_logps(model: nn.Module, batch: dict, chunk_size: int = 1024, as_training: bool = False) -> torch.Tensor:
    """The DPO reference's summed log-probs ``[rows]`` (fp32): ``batch["reference_logps"]`` when the batch carries
    them (``reference_cache``), else ``sequence_logps`` under ``model.reference.reference`` (the frozen starting
    adapter, or the bare base), without gradient. ``as_training``: with the kernels of a grad-mode forward
    (``attention.training_kernels``), so the reference rounds exactly as the policy it is compared with in a
    training step (in 16-bit compute the short-attention and SDPA kernels round differently)."""
    if "reference_logps" in batch:
        return batch["reference_logps"].to(torch.float32)
    with torch.no_grad(), reference(model), training_kernels(as_training):
        return sequence_logps(model, batch, chunk_size)[0]


def dpo_pair_losses(policy: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor, tc: TrainingConfig
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses ``[b]`` and the rewards ``[2b]`` (detached), from summed log-probs ``[2b]`` (chosen
    first) of the policy and the reference and the response token counts ``[2b]``."""
    ratios = policy - reference  # [2b] log pi / ref per response
    chosen, rejected = ratios.chunk(2)  # [b], [b]
    beta = tc.dpo_beta
    if tc.dpo_loss == "sigmoid":
        margin = beta * (chosen - rejected)  # [b]
        losses = -(1 - tc.label_smoothing) * F.logsigmoid(margin) - tc.label_smoothing * F.logsigmoid(-margin)
    elif tc.dpo_loss == "ipo":
        n_chosen, n_rejected = tokens.clamp(min=1).chunk(2)  # [b], [b]
        losses = (chosen / n_chosen - rejected / n_rejected - 1 / (2 * beta)) ** 2
    elif tc.dpo_loss == "hinge":
        losses = torch.relu(1 - beta * (chosen - rejected))
    else:
        raise ValueError(f"unknown dpo_loss {tc.dpo_loss!r}; use sigmoid, ipo or hinge")
    return losses, beta * ratios.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and for very negative x."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_pair_terms(mean_logps: torch.Tensor, orpo_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO's ``log s(log odds(chosen) - log odds(rejected))`` per pair ``[b]`` from token-mean log-probs ``[2b]``
    (chosen first), and the rewards ``orpo_lambda * mean_logps`` ``[2b]`` (detached)."""
    chosen, rejected = mean_logps.chunk(2)  # [b], [b]
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))  # [b]
    return F.logsigmoid(log_odds), orpo_lambda * mean_logps.detach()


def _stats(rewards: torch.Tensor) -> PairStats:
    chosen, rejected = rewards.chunk(2)  # [b], [b]
    return PairStats(len(chosen), chosen.sum().item(), rejected.sum().item(), (chosen > rejected).sum().item())


def preference_loss(model: nn.Module, batch: dict, tc: TrainingConfig, totals: StepTotals
                    ) -> tuple[torch.Tensor, PairStats]:
    """This micro-batch's share of the step loss (0-dim fp32, attached to the graph) and its pair statistics.

    ``batch``: collated pairs, chosen rows first (``collate_pairs``). ``tc.objective`` picks DPO or ORPO and
    ``tc`` holds their settings; ``totals`` are the whole step's, so summing the returned losses over the
    step's micro-batches gives the big-batch loss. Raises ValueError for another objective.
    """
    if tc.objective == "dpo":
        # [2b], with the kernels the policy's forward below takes (a training step's, or evaluation's)
        reference = reference_logps(model, batch, tc.loss_chunk_size, as_training=torch.is_grad_enabled())
        policy, tokens = sequence_logps(model, batch, tc.loss_chunk_size)  # [2b], [2b]
        losses, rewards = dpo_pair_losses(policy, reference, tokens, tc)
        return losses.sum() / max(totals.pairs, 1), _stats(rewards)
    if tc.objective == "orpo":
        policy, tokens = sequence_logps(model, batch, tc.loss_chunk_size)  # [2b], [2b]
        ratio, rewards = orpo_pair_terms(policy / tokens.clamp(min=1), tc.orpo_lambda)
        nll = -policy.chunk(2)[0].sum() / max(totals.chosen_tokens, 1)
        return nll - tc.orpo_lambda * ratio.sum() / max(totals.pairs, 1), _stats(rewards)
    raise ValueError(f"preference_loss needs training.objective dpo or orpo, got {tc.objective!r}")


class PreferenceLoss(nn.Module):
    """The model plus a preference loss as one module (as ``step.SupervisedLoss``), so DDP wraps the whole step.

    ``begin_step`` takes the step's collated micro-batches (every rank's) and fixes the totals each
    micro-batch's loss is divided by; ``forward`` returns that already-normalised share and adds the batch's
    pair statistics to ``stats``.
    """

    def __init__(self, model: nn.Module, tc: TrainingConfig):
        super().__init__()
        self.model, self.tc = model, tc
        self.totals = StepTotals(1, 1)  # of the current step, set by begin_step
        self.stats = PairStats()  # of the current step on this rank

    def begin_step(self, batches: list[dict]) -> None:
        """Start a step over these micro-batches (all ranks'): fix its totals, reset the statistics."""
        self.totals, self.stats = StepTotals.of(batches), PairStats()

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of the step's preference loss (0-dim)."""
        loss, stats = preference_loss(self.model, batch, self.tc, self.totals)
        self.stats = self.stats.add(stats)
        return loss


@torch.no_grad()
def evaluate_preference(model: nn.Module, batches: list[dict], tc: TrainingConfig) -> dict[str, float]:
    """``eval_loss`` (the objective's loss over all the pairs) and the ``PairStats.means`` of collated pair
    batches, in eval mode (restored after)."""
    was_training = model.training
    model.eval()
    totals, stats, loss = StepTotals.of(batches), PairStats(), 0.0
    for batch in batches:
        part, s = preference_loss(model, batch, tc, totals)
        loss, stats = loss + part.item(), stats.add(s)
    model.train(was_training)
    return {"eval_loss": loss, **{f"eval_{k}": v for k, v in stats.means().items()}}
