"""The trajectory record: what one agent run produced, and what Flow-GRPO trains on.

A trajectory keeps, for every planner turn, the exact token ids the engine saw and produced and
the log-probs it sampled them with, plus the policy version of the weights that generated them.
The learner never re-tokenizes text: re-tokenization changes ids at merge boundaries and would
silently make the importance ratio wrong. Everything here is plain data that round-trips through
JSON (for MLflow artifacts and ``--json``) and through the gRPC messages.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Verdict(StrEnum):
    STOP = "STOP"
    CONTINUE = "CONTINUE"


class StopReason(StrEnum):
    VERIFIER_STOP = "verifier_stop"
    TURN_BUDGET = "turn_budget"
    TIME_BUDGET = "time_budget"
    ERROR = "error"


@dataclass
class PlannerTurn:
    """One planner generation: the only tokens Flow-GRPO computes a loss on."""

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # sampling log-prob of each response token, len == len(response_ids)
    policy_version: int
    text: str = ""
    parsed: bool = True  # False when the output had to go through the fallback parser
    # The JSON schema the engine's grammar constrained sampling with (as the engine was given it,
    # JSON text); "" when sampling was unconstrained. The log-probs are then under the
    # grammar-masked distribution, and the learner re-scores under the same mask
    # (``flowlane.trainer.constrained``).
    json_schema: str = ""

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.response_ids):
            raise ValueError(
                f"PlannerTurn: {len(self.logprobs)} logprobs for {len(self.response_ids)} response tokens"
            )


@dataclass
class Step:
    """One entry of the agent's evolving memory."""

    turn: int
    tool_name: str
    sub_goal: str
    context: str = ""
    justification: str = ""
    command: str = ""
    result: str = ""
    tool_ok: bool = True
    verdict: Verdict = Verdict.CONTINUE
    verifier_reason: str = ""
    duration_s: float = 0.0


@dataclass
class Trajectory:
    question: str
    question_id: str = ""
    gold_answer: str | None = None
    query_analysis: str = ""
    steps: list[Step] = field(default_factory=list)
    planner_turns: list[PlannerTurn] = field(default_factory=list)
    answer: str = ""
    reward: float | None = None
    stop_reason: StopReason = StopReason.TURN_BUDGET
    parse_failures: dict[str, int] = field(default_factory=dict)  # module name -> count
    tool_calls: dict[str, int] = field(default_factory=dict)  # tool name -> count
    tool_errors: dict[str, int] = field(default_factory=dict)  # tool name -> count
    duration_s: float = 0.0
    generated_tokens: int = 0  # all modules, for throughput accounting
    answer_finish_reason: str = "stop"  # the answer's generation: "length" at its token cap, "time_limit" if cut

    def count_parse_failure(self, module: str) -> None:
        self.parse_failures[module] = self.parse_failures.get(module, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trajectory:
        data = dict(data)
        data["steps"] = [Step(**{**s, "verdict": Verdict(s["verdict"])}) for s in data.get("steps", [])]
        data["planner_turns"] = [PlannerTurn(**t) for t in data.get("planner_turns", [])]
        data["stop_reason"] = StopReason(data.get("stop_reason", StopReason.TURN_BUDGET))
        return cls(**data)
