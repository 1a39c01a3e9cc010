"""What one gateway serves and how much a request may use: ``GatewayConfig``, checked when built.

``flowlane serve`` builds it from its flags (``gateway.py``), tests and benchmarks directly; the
request handlers (``app.py``), the admission checks (``admission.py``) and the agent runs
(``runs.py``) read it and never change it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flowlane.api.errors import ConfigError
from flowlane.runtime.serving.protocol import RequestLimits, StepDisplay

if TYPE_CHECKING:
    from flowlane.runtime.agent.agent import AgentConfig

#: Tokens of a module prompt besides the conversation: instructions, tool cards, worked examples,
#: a full memory (``memory_total_chars`` plus the newest step in full) and the longest output (the
#: planner's 256). The planner's prompt is the longest: ~1,500 tokens with the bundled tools and a
#: full memory of prose, ~2,050 when the memory is digits and code (a token every character or
#: two), measured with SmolLM2's tokenizer (tests/test_gateway.py checks this bound).
PROMPT_RESERVE_TOKENS = 2560


@dataclass(frozen=True)
class GatewayConfig:
    """What one gateway serves and how much a request may use."""

    served_model_name: str
    api_key: str | None = None  # bearer token required on /v1/*; None: no auth
    limits: RequestLimits = field(default_factory=RequestLimits)
    answer_reserve_s: float = 30.0  # of a request's time, kept for the answer (at most ANSWER_SHARE of it)
    max_concurrent_runs: int = 64  # agent runs in flight; one more request gets a 429
    history_max_tokens: int = 1024  # the conversation's tokens in each module prompt; oldest turns dropped
    max_body_bytes: int = 1 << 20
    steps: StepDisplay = StepDisplay.NONE  # where streamed step text goes unless a request says
    agent: AgentConfig | None = None  # sampling and token budgets; turns and time are set per request

    def __post_init__(self) -> None:
        if not self.served_model_name.strip():
            raise ConfigError("served model name is empty; pass --served-model-name NAME")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty; pass a non-empty --api-key or leave it out to disable auth")
        checks = {
            "max_turns": (self.limits.max_turns, 1),
            "max_content_chars": (self.limits.max_content_chars, 1),
            "max_messages": (self.limits.max_messages, 1),
            "max_concurrent_runs": (self.max_concurrent_runs, 1),
            "max_body_bytes": (self.max_body_bytes, 1024),
            "history_max_tokens": (self.history_max_tokens, 16),
            "max_answer_tokens": (self.limits.max_answer_tokens, 1),
        }
        for name, (value, least) in checks.items():
            if value < least:
                raise ConfigError(f"{name} must be >= {least}, got {value}")
        if not self.limits.max_time_s > 0:
            raise ConfigError(f"max_time_s must be > 0, got {self.limits.max_time_s}")
        if not self.answer_reserve_s > 0:
            raise ConfigError(f"answer_reserve_s must be > 0, got {self.answer_reserve_s}")
