"""The learner's configuration: ``LearnerConfig`` with its validation, the LoRA settings, and the
learning-rate schedule the config names (``lr_factor``; ``ScheduleFn`` wraps it for torch's ``LambdaLR``).

Plain data, no model involved: ``flowlane.trainer.learner_service`` builds a ``LearnerConfig`` from
a FlowRun spec and the engine (``flowlane.trainer.learner.Learner``) runs under it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from flowlane.api.enums import Dtype
from flowlane.api.errors import ConfigError
from flowlane.trainer import flow_grpo
from flowlane.trainer.batching import BatchLayout


class LRSchedule(StrEnum):
    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


@dataclass
class LoraSettings:
    """A LoRA adapter instead of full fine-tuning: only the adapter is trained and checkpointed."""

    r: int = 16  # adapter rank, >= 1
    alpha: int = 32  # scaling numerator: the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapter input, in [0, 1); 0 keeps old/new log-probs comparable
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora.r: must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules: must name at least one module, e.g. ['q_proj', 'v_proj']")


@dataclass
class LearnerConfig:
    """Everything the learner needs, as plain data. Defaults follow the paper where it says.

    Gradient accumulation is by tokens, not by a fixed count: an update's turns are laid out in
    as many micro-batches as ``micro_batch_tokens`` requires and all of their gradients
    accumulate into one optimizer step (each micro-batch's loss already carries its share of the
    update's averaging weights, so the result does not depend on the packing).
    ``mini_batches_per_step`` > 1 splits a step's groups into several such updates and
    ``ppo_epochs`` > 1 runs over all of them that many times (PPO-style); with either, the
    log-probs of the policy before the step are computed once up front and every update's ratio
    is taken against them, so the clip range bounds how far one step moves the policy.
    """

    model_path: str  # HF-layout model directory (or a name flowlane.kit.models.resolve_model knows)
    lr: float = 1e-6  # peak learning rate (paper: 1e-6), > 0
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas, each in [0, 1)
    weight_decay: float = 0.01  # AdamW decoupled weight decay, >= 0
    warmup_steps: int = 0  # updates with a linear ramp up to lr, >= 0
    lr_schedule: LRSchedule = LRSchedule.CONSTANT  # shape after warmup
    total_steps: int = 0  # length of a linear/cosine decay (required > warmup_steps for those)
    min_lr_ratio: float = 0.0  # lr floor of a decay, as a fraction of lr, in [0, 1]
    clip_eps_low: float = 0.2  # ratio clipped below at 1 - clip_eps_low, in [0, 1)
    clip_eps_high: float = 0.3  # ratio clipped above at 1 + clip_eps_high (reference code: 0.3), >= 0
    kl_beta: float = 0.001  # weight of the KL penalty (paper: 0.001); 0 drops the reference model
    kl_estimator: flow_grpo.KLEstimator = flow_grpo.KLEstimator.K3
    advantage_mode: flow_grpo.AdvantageMode = flow_grpo.AdvantageMode.TRAJECTORY
    advantage_eps: float = 1e-6  # added to the group std, > 0
    normalize_advantage_std: bool = True  # divide by the group std (False: mean-centred only)
    aggregation: flow_grpo.Aggregation = flow_grpo.Aggregation.PAPER
    # Tokens (prompt + response, padding included) per forward pass, >= 1; raise it on GPUs.
    micro_batch_tokens: int = 2048
    # shared: turns merged into a prefix tree, common prompt prefixes computed once (2.5x padded on
    # real-shaped planner turns, bench/learner.py); padded: length-sorted rows; packed: turns end
    # to end (best with a varlen flash-attention backend). See flowlane.trainer.batching.
    batch_layout: BatchLayout = BatchLayout.SHARED
    attn_implementation: str | None = None  # transformers attention backend; None: its default (sdpa)
    mini_batches_per_step: int = 1  # optimizer updates per pass over a step; the groups are split evenly
    ppo_epochs: int = 1  # passes over a step's samples, >= 1; each pass runs every mini-batch's update
    max_grad_norm: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    zero_stage: int = 0  # DeepSpeed ZeRO stage, 0-3
    dtype: Dtype = Dtype.AUTO
    lora: LoraSettings | None = None  # None: full fine-tuning
    temperature: float = 1.0  # the sampling temperature of the rollouts: logits are divided by it, > 0
    tis_cap: float | None = 2.0  # cap of the truncated importance weight; None disables TIS
    skip_uniform_groups: bool = True  # drop groups whose rewards are all equal (they are counted anyway)
    gradient_checkpointing: bool = False  # trade compute for activation memory
    seed: int = 0

    def __post_init__(self) -> None:
        # Accept plain strings (from YAML/JSON) for the enum fields.
        for name, kind in (
            ("lr_schedule", LRSchedule),
            ("kl_estimator", flow_grpo.KLEstimator),
            ("advantage_mode", flow_grpo.AdvantageMode),
            ("aggregation", flow_grpo.Aggregation),
            ("dtype", Dtype),
            ("batch_layout", BatchLayout),
        ):
            value = getattr(self, name)
            try:
                setattr(self, name, kind(value))
            except ValueError:
                choices = ", ".join(member.value for member in kind)
                raise ConfigError(f"{name}: unknown value {value!r}; choose one of: {choices}") from None
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        if self.lora is not None:
            self.lora.target_modules = tuple(self.lora.target_modules)
        if self.dtype is Dtype.FLOAT16:
            # float16 training needs loss scaling, which this learner does not do.
            raise ConfigError("dtype: float16 is not supported by the learner; choose one of: auto, float32, bfloat16")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        self.validate()

    def validate(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.lr > 0, f"lr: must be > 0, got {self.lr}"),
            (all(0 <= b < 1 for b in self.betas), f"betas: each must be in [0, 1), got {self.betas}"),
            (self.weight_decay >= 0, f"weight_decay: must be >= 0, got {self.weight_decay}"),
            (self.warmup_steps >= 0, f"warmup_steps: must be >= 0, got {self.warmup_steps}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}"),
            (0 <= self.clip_eps_low < 1, f"clip_eps_low: must be in [0, 1), got {self.clip_eps_low}"),
            (self.clip_eps_high >= 0, f"clip_eps_high: must be >= 0, got {self.clip_eps_high}"),
            (self.kl_beta >= 0, f"kl_beta: must be >= 0, got {self.kl_beta}"),
            (self.advantage_eps > 0, f"advantage_eps: must be > 0, got {self.advantage_eps}"),
            (self.micro_batch_tokens >= 1, f"micro_batch_tokens: must be >= 1, got {self.micro_batch_tokens}"),
            (
                self.mini_batches_per_step >= 1,
                f"mini_batches_per_step: must be >= 1, got {self.mini_batches_per_step}",
            ),
            (self.ppo_epochs >= 1, f"ppo_epochs: must be >= 1, got {self.ppo_epochs}"),
            (self.max_grad_norm >= 0, f"max_grad_norm: must be >= 0 (0 disables), got {self.max_grad_norm}"),
            (self.zero_stage in (0, 1, 2, 3), f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}"),
            (self.temperature > 0, f"temperature: must be > 0, got {self.temperature}"),
            (
                self.tis_cap is None or self.tis_cap > 0,
                f"tis_cap: must be > 0 or null to disable, got {self.tis_cap}",
            ),
            (
                self.lr_schedule == LRSchedule.CONSTANT or self.total_steps > self.warmup_steps,
                f"total_steps: a {self.lr_schedule} schedule needs total_steps > warmup_steps "
                f"({self.warmup_steps}), got {self.total_steps}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.lora is not None:
            self.lora.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: LRSchedule, min_ratio: float) -> float:
    """Multiplier of the peak lr for update number ``step`` (0-based).

    Warmup ramps linearly so the first update already moves ((step + 1) / warmup_steps); after it
    the lr stays constant or decays linearly / along a half cosine to ``min_ratio`` at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == LRSchedule.CONSTANT:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 1.0 - progress if schedule == LRSchedule.LINEAR else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


@dataclass
class ScheduleFn:
    """Picklable lr multiplier for ``LambdaLR`` (its state_dict then round-trips)."""

    warmup_steps: int
    total_steps: int
    schedule: str
    min_ratio: float

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.total_steps, LRSchedule(self.schedule), self.min_ratio)
