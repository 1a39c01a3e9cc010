"""The named choices the spec, the learner and the rollout side share, each defined once.

A FlowRun's YAML, the learner's plain-data config, the Flow-GRPO registries and the rollout
engines all pick from these sets. Each is one ``StrEnum`` whose values are the spellings the
FlowRun API accepts (and the generated CRD lists); internal code uses the same members, so no
alias table translates between two versions of one choice. Where a subset is offered to users
(the engines a spec may choose), a ``Literal`` of its members narrows the type; nothing redefines it.
"""

from __future__ import annotations

import enum
from typing import Literal, get_args


class Dtype(enum.StrEnum):
    """Weight dtype of the learner and the engines; ``auto`` picks per machine (``flowlane.kit.dtype``)."""

    AUTO = "auto"  # bfloat16 on GPUs that support it, float32 on CPU
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class KLEstimator(enum.StrEnum):
    """Per-token estimator of KL(pi || pi_ref) (``flowlane.trainer.flow_grpo.kl``)."""

    K1 = "k1"  # log(pi/pi_ref): unbiased, high variance, can go negative
    K3 = "k3"  # pi_ref/pi - log(pi_ref/pi) - 1: unbiased, non-negative, lower variance


class AdvantageMode(enum.StrEnum):
    """Which samples a question's rewards are normalised over (``flowlane.trainer.flow_grpo.advantages``)."""

    TRAJECTORY = "trajectory"  # the paper: normalise final rewards over the G trajectories of a question
    TURN = "turn"  # the reference code: normalise over all planner-turn samples of a question


class Aggregation(enum.StrEnum):
    """How per-token losses are averaged into one number (``flowlane.trainer.flow_grpo.losses``)."""

    PAPER = "paper"  # mean over tokens, then turns, then trajectories (the paper's formula)
    TOKEN_MEAN = "tokenMean"  # one mean over every response token of the batch (the reference code)

    @classmethod
    def _missing_(cls, value: object) -> Aggregation | None:
        # Learner configs and checkpoints written before the spellings were unified say "token_mean".
        return cls.TOKEN_MEAN if value == "token_mean" else None


class RewardKind(enum.StrEnum):
    """How an answer is scored against a task's gold answer (``flowlane.runtime.rewards``)."""

    EXACT = "exact"  # normalised string equality
    NUMERIC = "numeric"  # numbers equal within a tolerance (exact match for non-numbers)
    CHOICE = "choice"  # option letters (A/B/C/D) compared
    GAME24 = "game24"  # a valid arithmetic expression over the question's four numbers that makes 24
    JUDGE = "judge"  # an LLM judge decides equivalence (needs a judge model)

    @classmethod
    def _missing_(cls, value: object) -> RewardKind | None:
        # Task files (the bundled multi-hop sets among them) may carry the long spellings.
        return {"exact_match": cls.EXACT, "llm_judge": cls.JUDGE}.get(str(value).strip().lower())


class EngineKind(enum.StrEnum):
    """An LLM engine implementation (``flowlane.runtime.engines``)."""

    VLLM = "vllm"  # vLLM in-process (CPU or CUDA build): batched, fast; the default
    TRANSFORMERS = "transformers"  # plain transformers: slow, for reference and debugging
    OPENAI = "openai"  # an OpenAI-compatible HTTP endpoint (fixed modules served elsewhere)


#: The engines that load weights from a local model directory and return token ids and sampling
#: log-probs: what a FlowRun's rollout and a FlowService's gateway may choose (the spec's narrowing).
LocalEngineKind = Literal[EngineKind.VLLM, EngineKind.TRANSFORMERS]
LOCAL_ENGINE_KINDS: frozenset[EngineKind] = frozenset(get_args(LocalEngineKind))
