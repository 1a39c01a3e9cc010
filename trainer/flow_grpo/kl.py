"""KL penalty to the frozen reference policy, estimated per sampled token.

Flow-GRPO keeps the planner near its starting point with ``beta * KL(pi_theta || pi_ref)`` as a
loss term (not folded into the reward). The exact KL needs the full distributions; on sampled
tokens two standard single-sample estimators are used (Schulman's notation, x ~ pi_theta):

- ``k1`` = log pi_theta(x) - log pi_ref(x): unbiased but high-variance, can be negative;
- ``k3`` = exp(log pi_ref - log pi_theta) - (log pi_ref - log pi_theta) - 1: unbiased, always
  >= 0 and low-variance (what GRPO implementations call ``low_var_kl``).

The log-ratio is clamped to [-20, 20] before the exponential so one wild token cannot overflow.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flowlane.api.enums import KLEstimator

LOG_RATIO_LIMIT = 20.0


def kl_k1(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """log pi - log pi_ref. Shapes: (n_tokens,), (n_tokens,) -> (n_tokens,)."""
    return log_prob - ref_log_prob


def kl_k3(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """exp(d) - d - 1 with d = log pi_ref - log pi. Shapes: (n_tokens,), (n_tokens,) -> (n_tokens,)."""
    d = torch.clamp(ref_log_prob - log_prob, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return torch.exp(d) - d - 1.0


KL_ESTIMATORS: dict[KLEstimator, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    KLEstimator.K1: kl_k1,
    KLEstimator.K3: kl_k3,
}
