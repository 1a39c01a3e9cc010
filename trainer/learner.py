"""The learner: turns scored trajectories into one Flow-GRPO update of the planner.

This is the shell around the pure math in ``flowlane.trainer.flow_grpo``. It owns the policy
(a transformers causal LM, fully fine-tuned or with a LoRA adapter) inside a DeepSpeed engine,
a frozen reference policy for the KL term, and the policy version that every rollout sample is
stamped with. One ``step(trajectories)`` call is one update:

1. group the trajectories by question and set aside groups whose rewards are all equal (they
   carry no signal; counted, and skipped unless configured otherwise);
2. compute group advantages and broadcast each trajectory's value to all its planner turns;
3. lay the turns out in micro-batches under a token budget (length-sorted rows or packed rows,
   see ``batching``; the learner never computes logits for prompt or pad positions);
4. per micro-batch: recompute log-probs with ``logits / temperature``, the reference log-probs,
   the clipped loss with truncated importance weights against the sampling-time log-probs, and
   backpropagate its share of the loss (gradients accumulate across micro-batches);
5. clip the gradient norm, step the optimizer and the lr schedule, bump the policy version.

With ``mini_batches_per_step`` > 1 or ``ppo_epochs`` > 1, steps 4-5 run once per mini-batch and
pass (PPO-style) and every ratio is taken against the log-probs of the policy before the step,
computed once up front; the clip range then bounds how far the step moves the policy and the
``clip_frac*`` metrics count the tokens whose clipped term was active (no gradient).

DeepSpeed runs in one process without a launcher: when no distributed environment is set, the
learner sets a single-rank one (gloo on CPU) itself. Under a launcher (``torchrun``, as
``flowlane run`` and the learner pod start several ranks) the environment it provides is used as
is. ZeRO stages 0-3 are supported; bf16 is used where the hardware has it (``dtype="auto"``),
float32 otherwise.

With several ranks (data parallel) every rank is handed the same trajectories and calls the same
methods in the same order (``trainer.distributed`` arranges that). Each rank runs its share of an
update's micro-batches (round-robin, padded with a zero-weight one so every rank runs as many
forward/backward passes, which ZeRO-3's parameter gathers need); DeepSpeed averages the gradients
over the ranks at ``step``, so each rank scales its loss by the world size and the update is the
sum over all micro-batches, as on one rank.

Checkpoints (``save_checkpoint_files``) are a directory that vLLM and transformers load directly
(safetensors, config, tokenizer; with LoRA the adapter files) plus everything exact resumption
needs: DeepSpeed's optimizer and lr-scheduler state, the RNG states, the step and policy version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import json
import logging
import math
import os
import random
import shutil
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowlane.api.enums import Dtype
from flowlane.api.errors import ConfigError, FlowlaneError
from flowlane.api.trajectory import Trajectory
from flowlane.kit.checkpoints import DEEPSPEED_DIR, RNG_FILE
from flowlane.kit.dtype import resolve_dtype
from flowlane.kit.lora import (
    STATE_FILE,
    TOKENIZER_FILES,
    describe_identity,
    weights_identity,
)
from flowlane.kit.models import resolve_model
from flowlane.trainer import flow_grpo
from flowlane.trainer.batching import BatchLayout, MicroBatch, lay_out, plan_sequences
from flowlane.trainer.constrained import GrammarMasks, masked_log_softmax

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
DEEPSPEED_TAG = "state"



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

    model_path: str  # HF-layout model directory (or a name runtime.models.resolve_model knows)
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
class _ScheduleFn:
    """Picklable lr multiplier for ``LambdaLR`` (its state_dict then round-trips)."""

    warmup_steps: int
    total_steps: int
    schedule: str
    min_ratio: float

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.total_steps, LRSchedule(self.schedule), self.min_ratio)


# --- preparing an update (pure) ------------------------------------------------------------------


@dataclass(frozen=True)
class TurnSample:
    """One planner turn as the loss sees it."""

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    behaviour_logprobs: Sequence[float]
    policy_version: int
    advantage: float
    trajectory: int  # index of its trajectory within the update
    json_schema: str = ""  # the schema it was sampled under ("" unconstrained); scored under its mask


@dataclass
class PreparedBatch:
    """The trainable part of a step's trajectories, split into optimizer updates."""

    updates: list[list[TurnSample]] = field(default_factory=list)  # one list per mini-batch
    groups: int = 0
    groups_uniform: int = 0
    groups_skipped: int = 0
    trajectories: int = 0
    turns: int = 0
    advantages: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # per trained trajectory
    reward_mean: float = 0.0


def prepare_batch(
    trajectories: Sequence[Trajectory],
    advantage_mode: flow_grpo.AdvantageMode,
    advantage_eps: float,
    normalize_std: bool,
    skip_uniform_groups: bool,
    mini_batches: int = 1,
) -> PreparedBatch:
    """Group, score and flatten trajectories into turn samples; pure, no model involved."""
    groups: dict[str, list[Trajectory]] = {}
    for position, trajectory in enumerate(trajectories):
        if trajectory.reward is None:
            raise FlowlaneError(
                f"trajectory {position} (question_id={trajectory.question_id!r}) has no reward; "
                "score trajectories before sending them to the learner"
            )
        groups.setdefault(trajectory.question_id or trajectory.question, []).append(trajectory)
    prepared = PreparedBatch(groups=len(groups))
    if not groups:
        return prepared
    ordered = list(groups.values())
    flat = [t for group in ordered for t in group]
    group_index = torch.tensor([g for g, group in enumerate(ordered) for _ in group], dtype=torch.long)
    rewards = torch.tensor([float(t.reward or 0.0) for t in flat], dtype=torch.float64)
    turns = torch.tensor([len(t.planner_turns) for t in flat], dtype=torch.long)
    prepared.reward_mean = float(rewards.mean().item())
    uniform = flow_grpo.uniform_groups(rewards, group_index)
    prepared.groups_uniform = int(uniform.sum().item())
    estimator = flow_grpo.ADVANTAGE_ESTIMATORS[advantage_mode]
    advantages = estimator(rewards, group_index, turns, advantage_eps, normalize_std)

    keep = [g for g in range(len(ordered)) if not (skip_uniform_groups and bool(uniform[g]))]
    prepared.groups_skipped = len(ordered) - len(keep)
    n_updates = max(1, min(mini_batches, len(keep)))
    chunks = [keep[i * len(keep) // n_updates : (i + 1) * len(keep) // n_updates] for i in range(n_updates)]
    kept_advantages: list[float] = []
    starts = list(itertools.accumulate((len(group) for group in ordered), initial=0))  # group -> first in flat
    for chunk in chunks:
        samples: list[TurnSample] = []
        trajectory_in_update = 0
        for g in chunk:
            for k, trajectory in enumerate(ordered[g]):
                advantage = float(advantages[starts[g] + k].item())
                kept_advantages.append(advantage)
                trained = [turn for turn in trajectory.planner_turns if turn.response_ids]
                for turn in trained:
                    samples.append(
                        TurnSample(
                            prompt_ids=turn.prompt_ids,
                            response_ids=turn.response_ids,
                            behaviour_logprobs=turn.logprobs,
                            policy_version=turn.policy_version,
                            advantage=advantage,
                            trajectory=trajectory_in_update,
                            json_schema=turn.json_schema,
                        )
                    )
                trajectory_in_update += bool(trained)
                prepared.trajectories += 1
        prepared.turns += len(samples)
        if samples:
            prepared.updates.append(samples)
    prepared.advantages = torch.tensor(kept_advantages, dtype=torch.float32)
    return prepared


def token_weights(samples: Sequence[TurnSample], aggregation: flow_grpo.Aggregation) -> list[torch.Tensor]:
    """Per-token loss weights of each sample for the whole update (see ``flow_grpo.losses``)."""
    token_turn = torch.cat(
        [torch.full((len(s.response_ids),), i, dtype=torch.long) for i, s in enumerate(samples)]
    )
    turn_trajectory = torch.tensor([s.trajectory for s in samples], dtype=torch.long)
    weights = flow_grpo.AGGREGATIONS[aggregation](token_turn, turn_trajectory)
    return list(torch.split(weights, [len(s.response_ids) for s in samples]))


# --- the learner -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rank_share(micro_batches: int, rank: int, world_size: int) -> list[int | None]:
    """Micro-batch indices rank ``rank`` runs: round-robin, padded with None (a zero-weight pass
    over micro-batch 0) so that every rank runs ``ceil(micro_batches / world_size)`` passes."""
    mine: list[int | None] = list(range(rank, micro_batches, world_size))
    passes = -(-micro_batches // world_size)
    return mine + [None] * (passes - len(mine))


def uneven_shards(numels: Sequence[tuple[str, int]], world_size: int) -> list[tuple[str, int]]:
    """The parameters (name, element count) that ZeRO-3 cannot split into ``world_size`` equal shards."""
    return [(name, numel) for name, numel in numels if numel % world_size]


def ensure_distributed() -> None:
    """Initialise torch.distributed for DeepSpeed; a single local rank when no launcher set one up."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if not torch.distributed.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if get_accelerator().device_name() == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel on first use
        # (minutes on a 2-core machine); a single rank never calls it and several CPU ranks use
        # gloo's all-reduce instead. Mark it unavailable: DeepSpeed keeps this probe result in one
        # module-level dict meant to be edited.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(
        dist_backend=get_accelerator().communication_backend_name(), auto_mpi_discovery=False, verbose=False
    )


def _resolve_dtype(dtype: Dtype) -> torch.dtype:
    resolved: torch.dtype = getattr(torch, resolve_dtype(dtype.value))
    return resolved


class Learner:
    """The policy in a DeepSpeed engine, a reference model, and one ``step`` per Flow-GRPO update."""

    def __init__(self, config: LearnerConfig) -> None:
        import deepspeed
        from transformers import AutoModelForCausalLM

        self.config = config
        self.model_dir = resolve_model(config.model_path)
        self.policy_version = 0
        self.steps = 0
        _seed_everything(config.seed)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        ensure_distributed()

        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        self.dtype = _resolve_dtype(config.dtype)
        load_options: dict[str, Any] = {"dtype": self.dtype}
        if config.attn_implementation:
            load_options["attn_implementation"] = config.attn_implementation
        policy: Any = AutoModelForCausalLM.from_pretrained(str(self.model_dir), **load_options)
        self.base_identity = weights_identity(policy)
        self.reference: torch.nn.Module | None = None
        if config.kl_beta > 0 and config.lora is None:
            self.reference = AutoModelForCausalLM.from_pretrained(str(self.model_dir), **load_options)
            self.reference.requires_grad_(False).eval()
        if config.lora is not None:
            from peft import LoraConfig, get_peft_model

            policy = get_peft_model(
                policy,
                LoraConfig(
                    r=config.lora.r,
                    lora_alpha=config.lora.alpha,
                    lora_dropout=config.lora.dropout,
                    target_modules=list(config.lora.target_modules),
                    bias="none",
                    task_type="CAUSAL_LM",
                ),
            )
        if config.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if config.lora is not None:
                policy.enable_input_require_grads()
        policy.config.use_cache = False
        policy.train()
        if config.zero_stage == 3 and self.world_size > 1:
            uneven = uneven_shards([(n, p.numel()) for n, p in policy.named_parameters() if p.requires_grad],
                                   self.world_size)
            if uneven:
                name, numel = uneven[0]
                raise ConfigError(
                    f"engine.zeroStage: 3 over {self.world_size} learner ranks (learner.ranks x learner.replicas): "
                    f"the model's layers do not shard evenly: {name} has {numel} elements, not a multiple of "
                    f"{self.world_size} (and {len(uneven) - 1} more); use a rank count that divides them or "
                    "zeroStage 2"
                )

        trainable = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, eps=1e-8
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            _ScheduleFn(config.warmup_steps, config.total_steps, config.lr_schedule.value, config.min_lr_ratio),
        )
        bf16 = self.dtype == torch.bfloat16
        # Stage 0 in float32 has no DeepSpeed optimizer wrapper that reports the gradient norm, so
        # the learner clips there itself; everywhere else DeepSpeed clips and reports it.
        self._clip_here = config.zero_stage == 0 and not bf16
        ds_config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            # The learner owns the accumulation boundary: step() after a variable number of micro-batches.
            "managed_gradient_accumulation": False,
            "gradient_clipping": 0.0 if self._clip_here else config.max_grad_norm,
            "zero_optimization": {"stage": config.zero_stage},
            "bf16": {"enabled": bf16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=policy, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
        )
        self.device = self.engine.device
        if self.reference is not None:
            self.reference.to(self.device)
        self._kl = flow_grpo.KL_ESTIMATORS[config.kl_estimator]
        # Turns sampled under a JSON schema are scored under its grammar mask (see ``constrained``).
        self._grammar = GrammarMasks(self.model_dir, int(self.base_identity.get("vocab_size") or 0))

    # --- one update ------------------------------------------------------------------------------

    def step(self, trajectories: Sequence[Trajectory]) -> dict[str, float]:
        """One Flow-GRPO update from a batch of scored trajectories; returns its metrics."""
        started = time.perf_counter()
        config = self.config
        batch = prepare_batch(
            trajectories,
            config.advantage_mode,
            config.advantage_eps,
            config.normalize_advantage_std,
            config.skip_uniform_groups,
            config.mini_batches_per_step,
        )
        samples = [s for update in batch.updates for s in update]
        self._check_token_ids(samples)
        staleness = [self.policy_version - s.policy_version for s in samples]
        metrics: dict[str, float] = {
            "groups": float(batch.groups),
            "groups_uniform": float(batch.groups_uniform),
            "groups_skipped": float(batch.groups_skipped),
            "trajectories": float(batch.trajectories),
            "turns": float(batch.turns),
            "reward_mean": batch.reward_mean,
            "staleness_mean": float(np.mean(staleness)) if staleness else 0.0,
            "staleness_max": float(max(staleness, default=0)),
        }
        stats = flow_grpo.advantage_stats(batch.advantages)
        metrics.update({f"advantage_{key}": value for key, value in stats.items()})
        self.steps += 1
        if not samples:
            metrics.update({"updated": 0.0, "policy_version": float(self.policy_version)})
            metrics["step_time_s"] = time.perf_counter() - started
            return metrics

        # With several updates per step (mini-batches, epochs), every update's ratio is taken
        # against the policy before the first one (pi_old), so those log-probs are computed once up
        # front, without gradient. With one update the policy is still pi_old: its own detached
        # log-probs serve (ratio 1, nothing clips) and the extra forward pass is saved.
        updates = [(offset, update) for offset, update in zip(
            itertools.accumulate((len(u) for u in batch.updates), initial=0), batch.updates, strict=False)]
        passes = [updates] * config.ppo_epochs
        n_updates = len(updates) * config.ppo_epochs
        old = self._score(samples) if n_updates > 1 else None
        totals = _Totals()
        grad_norms: list[float] = []
        lrs: list[float] = []
        for epoch in passes:
            for offset, update in epoch:
                old_update = old[offset : offset + len(update)] if old is not None else None
                lrs.append(float(self.optimizer.param_groups[0]["lr"]))
                self._accumulate(update, old_update, totals)
                grad_norm = self._optimizer_step()
                if grad_norm is not None:
                    grad_norms.append(grad_norm)
        self.policy_version += 1
        if self.world_size > 1:
            totals = totals.summed_over_ranks()
        elapsed = time.perf_counter() - started
        metrics.update(totals.as_metrics(n_updates))
        metrics.update(
            {
                "updated": 1.0,
                "optimizer_updates": float(n_updates),
                "lr": lrs[-1],
                "policy_version": float(self.policy_version),
                "step_time_s": elapsed,
                "tokens_per_s": totals.tokens_processed / elapsed if elapsed > 0 else 0.0,
            }
        )
        if grad_norms:
            metrics["grad_norm"] = float(np.mean(grad_norms))
        return metrics

    def _accumulate(
        self, samples: Sequence[TurnSample], old: Sequence[torch.Tensor] | None, totals: _Totals
    ) -> None:
        """Forward + backward of every micro-batch of one update; gradients accumulate."""
        config = self.config
        weights = token_weights(samples, config.aggregation)
        pairs = [(s.prompt_ids, s.response_ids) for s in samples]
        plans = plan_sequences(pairs, config.micro_batch_tokens, config.batch_layout)
        for planned in rank_share(len(plans), self.rank, self.world_size):
            indices = plans[0 if planned is None else planned]
            chosen = [samples[i] for i in indices]
            batch = lay_out([pairs[i] for i in indices], config.batch_layout)
            allowed = self._allowed(chosen)
            log_prob, entropy = self._log_probs(batch, with_entropy=True, allowed=allowed)
            weight = torch.cat([weights[i] for i in indices]).to(self.device)
            advantage = torch.cat(
                [torch.full((len(s.response_ids),), s.advantage, dtype=torch.float32) for s in chosen]
            ).to(self.device)
            behaviour = torch.cat(
                [torch.tensor(list(s.behaviour_logprobs), dtype=torch.float32) for s in chosen]
            ).to(self.device)
            old_log_prob = log_prob.detach() if old is None else torch.cat([old[i] for i in indices]).to(self.device)
            importance = (
                flow_grpo.truncated_importance_weights(old_log_prob, behaviour, config.tis_cap)
                if config.tis_cap is not None
                else None
            )
            terms = flow_grpo.clipped_policy_loss(
                log_prob, old_log_prob, advantage, config.clip_eps_low, config.clip_eps_high, importance
            )
            policy_loss = flow_grpo.aggregate(terms.loss, weight)
            loss = policy_loss
            kl_value = 0.0
            if self._has_reference:
                with torch.no_grad():
                    ref_log_prob, _ = self._log_probs(batch, with_entropy=False, reference=True, allowed=allowed)
                kl = flow_grpo.aggregate(self._kl(log_prob, ref_log_prob), weight)
                loss = loss + config.kl_beta * kl
                kl_value = float(kl.item())
            # DeepSpeed averages gradients over the ranks; scaling by their number makes it the sum.
            self.engine.backward(loss * (self.world_size if planned is not None else 0.0))
            if planned is None:  # the padding pass: same collectives, no weight, not counted
                continue
            n = log_prob.numel()
            totals.loss += float(loss.item())
            totals.policy_loss += float(policy_loss.item())
            totals.kl += kl_value
            totals.tokens += n
            totals.tokens_processed += batch.real_tokens
            totals.tokens_computed += batch.computed_tokens
            totals.micro_batches += 1
            totals.clipped_low += int(terms.clipped_low.sum().item())
            totals.clipped_high += int(terms.clipped_high.sum().item())
            totals.entropy_sum += float(entropy.sum().item()) if entropy is not None else 0.0
            totals.approx_kl_sum += flow_grpo.approx_kl(log_prob, old_log_prob) * n
            totals.behaviour_kl_sum += flow_grpo.approx_kl(old_log_prob, behaviour) * n
            if importance is not None and config.tis_cap is not None:  # weights exist only with a cap
                totals.tis_sum += float(importance.sum().item())
                totals.tis_capped += int((importance >= config.tis_cap).sum().item())

    def compute_gradients(self, trajectories: Sequence[Trajectory]) -> tuple[float, dict[str, torch.Tensor]]:
        """The loss and (unclipped) gradient that ``step`` would apply, without applying them.

        For checks and debugging; ZeRO stage 0 only (higher stages keep gradients partitioned).
        """
        if self.config.zero_stage != 0:
            raise ConfigError(f"compute_gradients needs zero_stage 0, this learner uses {self.config.zero_stage}")
        config = self.config
        batch = prepare_batch(
            trajectories,
            config.advantage_mode,
            config.advantage_eps,
            config.normalize_advantage_std,
            config.skip_uniform_groups,
        )
        totals = _Totals()
        for update in batch.updates:
            self._accumulate(update, None, totals)
        grads = {
            name: param.grad.detach().clone()
            for name, param in self.engine.module.named_parameters()
            if param.requires_grad and param.grad is not None
        }
        self.engine.zero_grad()
        return totals.loss, grads

    def _optimizer_step(self) -> float | None:
        grad_norm: float | None = None
        if self._clip_here:
            params = [p for p in self.engine.module.parameters() if p.requires_grad]
            limit = self.config.max_grad_norm if self.config.max_grad_norm > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, limit).item())
        self.engine.step()
        if not self._clip_here:
            reported = self.engine.get_global_grad_norm()
            grad_norm = float(reported) if reported is not None else None
        return grad_norm

    @property
    def _has_reference(self) -> bool:
        return self.config.kl_beta > 0

    def _allowed(self, samples: Sequence[TurnSample]) -> torch.Tensor | None:
        """The grammar masks (R, vocab) of a micro-batch's samples, in its token order; None if unconstrained."""
        return self._grammar.allowed([(s.json_schema, s.response_ids) for s in samples])

    def _log_probs(
        self,
        batch: MicroBatch,
        with_entropy: bool,
        reference: bool = False,
        allowed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (R,) of the batch's response tokens under logits / temperature, and entropies.

        ``allowed`` (R, vocab; True = allowed): the grammar masks of schema-constrained turns; the
        log-softmax is then over the allowed tokens only, the distribution those turns were sampled from.
        """
        keep = batch.logits_to_keep
        inputs: dict[str, Any] = {
            "input_ids": batch.input_ids.to(self.device),
            "position_ids": batch.position_ids.to(self.device),
            "logits_to_keep": keep.to(self.device) if isinstance(keep, torch.Tensor) else keep,
            "use_cache": False,
        }
        if batch.attention_mask is not None:
            inputs["attention_mask"] = batch.attention_mask.to(self.device)
        if not reference:
            logits = self.engine(**inputs).logits
        elif self.reference is not None:
            logits = self.reference(**inputs).logits
        else:  # LoRA: the reference policy is the base model, i.e. the adapter switched off
            with self.engine.module.disable_adapter():
                logits = self.engine.module(**inputs).logits
        logits = logits.reshape(-1, logits.shape[-1])
        if batch.attention_mask is not None:  # padded rows keep a few positions per row that are not scored
            logits = logits.index_select(0, batch.logit_index.to(self.device))
        logits = logits.float() / self.config.temperature
        log_softmax = masked_log_softmax(logits, allowed)
        log_prob = log_softmax.gather(-1, batch.target_ids.to(self.device).unsqueeze(-1)).squeeze(-1)
        entropy = flow_grpo.entropy_from_log_probs(log_softmax.detach()) if with_entropy else None
        return log_prob, entropy

    @torch.no_grad()
    def _score(self, samples: Sequence[TurnSample]) -> list[torch.Tensor]:
        """Current-policy log-probs of every sample, one tensor per sample (no gradient)."""
        result: list[torch.Tensor | None] = [None] * len(samples)
        layout = self.config.batch_layout
        pairs = [(s.prompt_ids, s.response_ids) for s in samples]
        for indices in plan_sequences(pairs, self.config.micro_batch_tokens, layout):
            batch = lay_out([pairs[i] for i in indices], layout)
            allowed = self._allowed([samples[i] for i in indices])
            log_prob, _ = self._log_probs(batch, with_entropy=False, allowed=allowed)
            pieces = torch.split(log_prob.detach(), [len(samples[i].response_ids) for i in indices])
            for i, piece in zip(indices, pieces, strict=True):
                result[i] = piece
        return [r if r is not None else torch.zeros(0) for r in result]

    def log_probs(self, prompt_ids: Sequence[int], response_ids: Sequence[int], json_schema: str = "") -> torch.Tensor:
        """Current log-probs of one response given its prompt (under logits / temperature; with
        ``json_schema``, under that schema's grammar mask, as a turn sampled under it is scored)."""
        with torch.no_grad():
            batch = lay_out([(prompt_ids, response_ids)], self.config.batch_layout)
            allowed = self._grammar.allowed([(json_schema, response_ids)])
            log_prob, _ = self._log_probs(batch, with_entropy=False, allowed=allowed)
        return log_prob.cpu()

    def _check_token_ids(self, samples: Sequence[TurnSample]) -> None:
        vocab = int(self.base_identity.get("vocab_size") or 0)
        for s in samples:
            if not s.prompt_ids:
                raise FlowlaneError(
                    "a planner turn has response tokens but no prompt ids; rollouts must record the exact "
                    "prompt token ids the engine saw"
                )
            largest = max(max(s.prompt_ids, default=0), max(s.response_ids, default=0))
            if vocab and largest >= vocab:
                raise FlowlaneError(
                    f"a planner turn holds token id {largest} but the model's vocabulary has {vocab} entries; "
                    "the rollouts were generated with a different tokenizer than the learner's model"
                )

    # --- weights -------------------------------------------------------------------------------

    @property
    def is_lora(self) -> bool:
        return self.config.lora is not None

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full model weights under their transformers names, for loading into vLLM.

        With LoRA each adapted weight is merged (W + scale * B @ A) on the fly; the adapter itself
        stays separate in training and checkpoints. The tensors are read-only CPU views of the
        live weights (copies under ZeRO-3); consume them before the next ``step``.
        """
        module = self.engine.module
        base = module.get_base_model() if self.is_lora else module
        for name, param in base.named_parameters():
            if self.is_lora and "lora_" in name:
                continue
            if self.is_lora and ".base_layer." in name:
                owner_name = name.split(".base_layer.")[0]
                owner = base.get_submodule(owner_name)
                export_name = name.replace(".base_layer.", ".")
                with _gathered(list(owner.parameters())):
                    tensor = param.detach()
                    if name.endswith(".weight"):
                        adapters = [a for a in owner.active_adapters if a in owner.lora_A]
                        for adapter in adapters:
                            tensor = tensor + owner.get_delta_weight(adapter).to(tensor.dtype)
                    yield export_name, tensor.cpu().clone()
                continue
            with _gathered([param]):
                tensor = param.detach().cpu()
                yield name, tensor.clone() if _is_partitioned(param) else tensor

    # --- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint_files(self, directory: Path) -> dict[str, Any]:
        """Write a resumable checkpoint into ``directory``; returns its metadata (also in learner_state.json).

        Layout: full fine-tuning -> ``config.json`` + ``model.safetensors`` (vLLM/transformers load
        the directory as a model); LoRA -> ``adapter_config.json`` + ``adapter_model.safetensors``
        (load on top of the base model). Plus tokenizer files, ``deepspeed/`` (optimizer and lr
        scheduler), ``rng_state.pt`` and ``learner_state.json``.

        With several ranks every rank calls this with the same (shared) directory: each writes its
        ZeRO shards and its RNG state, rank 0 the gathered model and the metadata; all return
        after every file is written.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        module = self.engine.module
        lead = self.rank == 0
        if self.is_lora:
            with _gathered([p for p in module.parameters() if p.requires_grad]):
                module.save_pretrained(str(directory), safe_serialization=True, is_main_process=lead)
        else:
            state = dict(self.export_weights())  # ZeRO-3: every rank takes part in each gather
            if lead:
                module.save_pretrained(str(directory), state_dict=state, safe_serialization=True)
            del state
        for name in TOKENIZER_FILES:
            source = self.model_dir / name
            if lead and source.is_file() and not (directory / name).exists():
                shutil.copy2(source, directory / name)
        self.engine.save_checkpoint(
            str(directory / DEEPSPEED_DIR),
            tag=DEEPSPEED_TAG,
            client_state={"policy_version": self.policy_version, "steps": self.steps},
            save_latest=False,
            exclude_frozen_parameters=self.is_lora,
        )
        torch.save(_rng_state(), directory / _rng_file(self.rank))
        meta = {
            "format": CHECKPOINT_FORMAT,
            "step": self.steps,
            "policy_version": self.policy_version,
            "training": "lora" if self.is_lora else "full",
            "lora": dataclasses.asdict(self.config.lora) if self.config.lora else None,
            "base_model": {"path": str(self.model_dir), **self.base_identity},
            "zero_stage": self.config.zero_stage,
            "world_size": self.world_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "config": _jsonable(self.config.to_dict()),
        }
        if lead:
            (directory / STATE_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if self.world_size > 1:
            torch.distributed.barrier()
        return meta

    def load_checkpoint_files(self, directory: Path) -> dict[str, Any]:
        """Restore weights, optimizer, lr schedule, RNG, step and policy version from ``directory``.

        Refuses (FlowlaneError) a checkpoint written for another base model or training mode,
        before touching any state.
        """
        directory = Path(directory)
        meta = self._read_checkpoint_meta(directory)
        load_path, _ = self.engine.load_checkpoint(
            str(directory / DEEPSPEED_DIR),
            tag=DEEPSPEED_TAG,
            load_module_strict=not self.is_lora,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise FlowlaneError(
                f"checkpoint {directory}: DeepSpeed found no state under {directory / DEEPSPEED_DIR}; "
                "the checkpoint is incomplete, resume from an earlier one"
            )
        _set_rng_state(torch.load(directory / _rng_file(self.rank), weights_only=True))
        self.steps = int(meta["step"])
        self.policy_version = int(meta["policy_version"])
        return meta

    def _read_checkpoint_meta(self, directory: Path) -> dict[str, Any]:
        state_file = directory / STATE_FILE
        try:
            meta: dict[str, Any] = json.loads(state_file.read_text())
        except FileNotFoundError:
            raise FlowlaneError(
                f"{directory} is not a learner checkpoint (no {STATE_FILE}); point to a directory "
                "written by Learner.save_checkpoint_files"
            ) from None
        except ValueError as error:
            raise FlowlaneError(f"{state_file} is not valid JSON ({error}); the checkpoint is corrupt") from None
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise FlowlaneError(
                f"{state_file}: checkpoint format {meta.get('format')!r} is not supported "
                f"(this learner reads format {CHECKPOINT_FORMAT})"
            )
        theirs = {k: v for k, v in dict(meta.get("base_model") or {}).items() if k != "path"}
        if theirs != self.base_identity:
            raise FlowlaneError(
                f"checkpoint {directory} was trained from another model "
                f"({(meta.get('base_model') or {}).get('path')}: {describe_identity(theirs)}) than this learner's "
                f"{self.model_dir} ({describe_identity(self.base_identity)}); resume with the model it was "
                "trained from, or start a fresh run"
            )
        mode = "lora" if self.is_lora else "full"
        if meta.get("training") != mode:
            raise FlowlaneError(
                f"checkpoint {directory} holds {meta.get('training')} fine-tuning state but this learner "
                f"is configured for {mode}; set lora to match the run that wrote it"
            )
        if self.is_lora and meta.get("lora") != _jsonable(dataclasses.asdict(self.config.lora or LoraSettings())):
            raise FlowlaneError(
                f"checkpoint {directory} has a LoRA adapter {meta.get('lora')} that differs from this "
                f"learner's lora settings; use the same r, alpha and target_modules to resume"
            )
        if int(meta.get("world_size", 1)) != self.world_size:
            raise FlowlaneError(
                f"checkpoint {directory} was written by {meta.get('world_size')} learner ranks but this learner "
                f"has {self.world_size}; resume on the same world size (learner.ranks x learner.replicas)"
            )
        if meta.get("zero_stage") != self.config.zero_stage:
            raise FlowlaneError(
                f"checkpoint {directory} was written with ZeRO stage {meta.get('zero_stage')} but this learner "
                f"uses stage {self.config.zero_stage}; resume with the same zero_stage"
            )
        return meta

    def close(self) -> None:
        """Release the engine and models (several learners in one process, e.g. tests)."""
        with contextlib.suppress(Exception):
            self.engine.destroy()
        self.engine = None
        self.reference = None
        self.optimizer = None
        self.lr_scheduler = None
        gc.collect()


@dataclass
class _Totals:
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

    def summed_over_ranks(self) -> _Totals:
        """Each field summed over all ranks (each counted only its own micro-batches)."""
        names = [f.name for f in dataclasses.fields(self)]
        values = torch.tensor([float(getattr(self, name)) for name in names], dtype=torch.float64)
        torch.distributed.all_reduce(values)
        kinds = {f.name: type(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return _Totals(**{name: kinds[name](value) for name, value in zip(names, values.tolist(), strict=True)})

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


def _is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def _gathered(params: list[torch.Tensor]) -> Iterator[None]:
    """Materialise ZeRO-3 partitioned parameters for reading; a no-op otherwise."""
    partitioned = [p for p in params if _is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def _rng_file(rank: int) -> str:
    """Rank 0's RNG state at the top (as with one rank), the other ranks' next to their ZeRO shards."""
    return RNG_FILE if rank == 0 else f"{DEEPSPEED_DIR}/rng_state_rank{rank}.pt"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON types (tuples become lists, enums their values)."""
    return json.loads(json.dumps(value, default=str))
