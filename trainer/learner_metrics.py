"""A learner step's metrics: ``Totals`` sums the micro-batches' losses, token counts, clipping and
importance-weight statistics (over all ranks, with several) and turns them into the means that
``Learner.step`` reports."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class Totals:
    """Sums over the micro-batches of a step, turned into means at the end."""

    loss: float = 0.0
    policy_loss: float = 0.0
    kl: float = 0.0
    tokens: int = 0
    tokens_processed: int = 0  # prompt + response tokens run through the model
    tokens_computed: int = 0  # positions run through the model: plus padding, minus shared prefixes
    micro_batches: int = 0
    clipped_low: int = 0
    clipped_high: int = 0
    entropy_sum: float = 0.0
    approx_kl_sum: float = 0.0
    behaviour_kl_sum: float = 0.0
    tis_sum: float = 0.0
    tis_capped: int = 0

    def summed_over_ranks(self) -> Totals:
        """Each field summed over all ranks (each counted only its own micro-batches)."""
        names = [f.name for f in dataclasses.fields(self)]
        values = torch.tensor([float(getattr(self, name)) for name in names], dtype=torch.float64)
        torch.distributed.all_reduce(values)
        kinds = {f.name: type(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return Totals(**{name: kinds[name](value) for name, value in zip(names, values.tolist(), strict=True)})

    def as_metrics(self, updates: int) -> dict[str, float]:
        n = max(self.tokens, 1)
        return {
            # Each update's loss is a weighted mean; report the mean over updates.
            "loss": self.loss / updates,
            "policy_loss": self.policy_loss / updates,
            "kl": self.kl / updates,
            "tokens": float(self.tokens),
            "tokens_processed": float(self.tokens_processed),
            # Padding adds computed positions, the shared layout's prefix tree removes them.
            "padding_frac": max(0.0, 1.0 - self.tokens_processed / max(self.tokens_computed, 1)),
            "computed_frac": self.tokens_computed / self.tokens_processed if self.tokens_processed else 0.0,
            "micro_batches": float(self.micro_batches),
            "clip_frac_low": self.clipped_low / n,
            "clip_frac_high": self.clipped_high / n,
            "clip_frac": (self.clipped_low + self.clipped_high) / n,
            "entropy": self.entropy_sum / n,
            "approx_kl": self.approx_kl_sum / n,
            "behaviour_approx_kl": self.behaviour_kl_sum / n,
            "tis_weight_mean": self.tis_sum / n if self.tis_sum else 1.0,
            "tis_capped_frac": self.tis_capped / n,
        }
