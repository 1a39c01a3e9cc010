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

The engine's parts live next to it: the config and lr schedule in ``learner_config``, preparing a
step's samples in ``learner_batch``, the step metrics in ``learner_metrics``, the checkpoint's RNG
and format details in ``learner_state``, and setting up the ranks in ``distributed``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowlane.api.enums import Dtype
from flowlane.api.errors import ConfigError, FlowlaneError
from flowlane.api.trajectory import Trajectory
from flowlane.kit.checkpoints import DEEPSPEED_DIR
from flowlane.kit.dtype import resolve_dtype
from flowlane.kit.lora import (
    STATE_FILE,
    TOKENIZER_FILES,
    adapter_config_text,
    describe_identity,
    weights_identity,
)
from flowlane.kit.models import resolve_model
from flowlane.trainer import flow_grpo
from flowlane.trainer.batching import MicroBatch, lay_out, plan_sequences
from flowlane.trainer.constrained import GrammarMasks, masked_log_softmax
from flowlane.trainer.distributed import ensure_distributed, rank_share, uneven_shards
from flowlane.trainer.learner_batch import TurnSample, prepare_batch, token_weights
from flowlane.trainer.learner_config import LearnerConfig, LoraSettings, ScheduleFn
from flowlane.trainer.learner_metrics import Totals
from flowlane.trainer.learner_state import (
    CHECKPOINT_FORMAT,
    DEEPSPEED_TAG,
    jsonable,
    rng_file,
    rng_state,
    seed_everything,
    set_rng_state,
)

log = logging.getLogger(__name__)


def _resolve_dtype(dtype: Dtype) -> torch.dtype:
    resolved: torch.dtype = getattr(torch, resolve_dtype(dtype.value))
    return resolved



class Learner:
    """The policy in a DeepSpeed engine, a reference model, and one ``step`` per Flow-GRPO update."""

    def __init__(self, config: LearnerConfig) -> None:
        # deepspeed and transformers are imported here, not with the module: they take seconds to load.
        import deepspeed
        from transformers import AutoModelForCausalLM

        self.config = config
        self.model_dir = resolve_model(config.model_path)
        self.policy_version = 0
        self.steps = 0
        seed_everything(config.seed)
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
            ScheduleFn(config.warmup_steps, config.total_steps, config.lr_schedule.value, config.min_lr_ratio),
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
        totals = Totals()
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
        self, samples: Sequence[TurnSample], old: Sequence[torch.Tensor] | None, totals: Totals
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
        totals = Totals()
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

    def export_adapter(self) -> tuple[str, list[tuple[str, torch.Tensor]]]:
        """The LoRA adapter alone, as PEFT saves it: the ``adapter_config.json`` text and the
        lora_A / lora_B tensors under PEFT's names (``base_model.model.<module>.lora_A.weight``),
        CPU copies. What a LoRA run's rollout engines load on top of the base model they hold."""
        from peft import get_peft_model_state_dict  # heavy, and LoRA runs only

        if not self.is_lora:
            raise ConfigError("export_adapter: this learner trains all weights (no lora); use export_weights")
        module = self.engine.module
        with _gathered([p for p in module.parameters() if p.requires_grad]):
            state = get_peft_model_state_dict(module)
            tensors = [(name, tensor.detach().cpu().clone()) for name, tensor in state.items()]
        return adapter_config_text(module.peft_config[module.active_adapter]), tensors

    def export_policy(self, adapter_only: bool) -> tuple[str, list[tuple[str, torch.Tensor]]]:
        """What one policy version publishes: with LoRA and ``adapter_only`` the adapter
        (``export_adapter``), else ("", the full weights of ``export_weights``, CPU-contiguous)."""
        if adapter_only and self.is_lora:
            return self.export_adapter()
        return "", [(name, tensor.detach().cpu().contiguous()) for name, tensor in self.export_weights()]

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
        torch.save(rng_state(), directory / rng_file(self.rank))
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
            "config": jsonable(self.config.to_dict()),
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
        set_rng_state(torch.load(directory / rng_file(self.rank), weights_only=True))
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
        if self.is_lora and meta.get("lora") != jsonable(dataclasses.asdict(self.config.lora or LoraSettings())):
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
