"""Numbers that tell whether a Flow-GRPO step was healthy, computed from tensors the loss already has.

- clip fractions (low/high): share of tokens where the clipped term is active, i.e. the update
  wanted to move the ratio further than the trust region allows; many clipped tokens mean the
  policy moved too far since sampling (lr too high or too stale samples);
- approximate KL between the old and the current policy (k3 estimator on sampled tokens);
- entropy of the sampling distribution (logits / temperature) per token: collapse shows as a drop;
- advantage statistics (mean/std/min/max): a std near 0 means most groups carried no signal.

Means are over the tokens passed in; the learner combines micro-batches by token count.
"""

from __future__ import annotations

import torch


def clip_fractions(clipped_low: torch.Tensor, clipped_high: torch.Tensor) -> tuple[float, float]:
    """Share of tokens clipped at the low / high bound. Shapes: (n_tokens,) bool each."""
    n = max(clipped_low.numel(), 1)
    return float(clipped_low.sum().item()) / n, float(clipped_high.sum().item()) / n


def approx_kl(log_prob: torch.Tensor, old_log_prob: torch.Tensor) -> float:
    """Mean of (r - 1) - log r with r = pi / pi_old: >= 0, ~ KL(old || new). Shapes: (n_tokens,) each."""
    if log_prob.numel() == 0:
        return 0.0
    log_ratio = (log_prob - old_log_prob).detach().double()
    return float((torch.expm1(log_ratio) - log_ratio).mean().item())


def entropy_from_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy of a normalised log-distribution along the last axis, in nats; (n, vocab) -> (n,).

    No gradient. Tokens with probability 0 (logit -inf, e.g. masked) contribute 0, not nan.
    """
    with torch.no_grad():
        p = log_probs.exp()
        return -torch.where(p > 0, p * log_probs, torch.zeros_like(p)).sum(dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) along the last axis, in nats. (n, vocab) -> (n,). No gradient."""
    with torch.no_grad():
        return entropy_from_log_probs(torch.log_softmax(logits.float(), dim=-1))


def advantage_stats(advantages: torch.Tensor) -> dict[str, float]:
    """mean / std (population) / min / max of a 1-D tensor; zeros when it is empty."""
    if advantages.numel() == 0:
        return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}
    values = advantages.detach().double()
    return {
        "mean": float(values.mean().item()),
        "std": float(values.std(unbiased=False).item()),
        "min": float(values.min().item()),
        "max": float(values.max().item()),
    }
