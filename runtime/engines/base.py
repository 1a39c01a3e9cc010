"""The one interface every LLM engine implements.

The agent talks to engines only through ``LLMEngine.chat``: it passes chat messages and sampling
settings and gets back a ``Generation`` that carries the exact prompt token ids the engine fed the
model, the generated token ids and the log-prob each token was sampled with. Those three lists are
the training record for planner turns; engines that cannot report them (a remote HTTP endpoint
that returns text only) say so with ``reports_token_ids = False`` and are fine for the frozen
modules but refused for a planner that is being trained.

Engines are asynchronous so that many trajectories can run concurrently and the engine can batch
their requests (vLLM's continuous batching, a batching queue for transformers).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

# re-exported (the engines import them from here); defined once in flowlane.kit.dtype
from flowlane.kit.dtype import DTYPES as DTYPES
from flowlane.kit.dtype import resolve_dtype as resolve_dtype


@dataclass(frozen=True)
class SamplingSettings:
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # JSON schema for schema-constrained decoding; engines without support ignore it and the
    # caller's parser handles free text.
    json_schema: dict[str, Any] | None = field(default=None, hash=False)


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token under the sampling distribution
    text: str
    finish_reason: str = "stop"
    policy_version: int = 0
    # The JSON schema the engine enforced while sampling (JSON text), "" when it enforced none;
    # with one, ``logprobs`` are under the schema-masked distribution.
    json_schema: str = ""


class LLMEngine(abc.ABC):
    """An LLM that turns chat messages into a ``Generation``."""

    name: str = "engine"
    #: True when ``Generation.prompt_ids/token_ids/logprobs`` are exact (trainable planner turns).
    reports_token_ids: bool = True
    #: True when ``SamplingSettings.json_schema`` is enforced during decoding.
    supports_structured_output: bool = False

    def __init__(self) -> None:
        self.policy_version = 0

    @abc.abstractmethod
    async def chat(self, messages: list[dict[str, str]], settings: SamplingSettings) -> Generation:
        """Generate one completion for ``messages`` (OpenAI-style role/content dicts)."""

    async def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], policy_version: int) -> None:
        """Replace the model weights in place (weight sync from the learner) without a restart."""
        raise NotImplementedError(f"{self.name} engine cannot load new weights in place")

    async def close(self) -> None:  # noqa: B027 - optional hook, remote engines hold nothing
        """Release processes and memory. Safe to call twice."""


class WrappedEngine(LLMEngine):
    """An engine in front of another: same capabilities and policy version, every call passed on.

    Subclasses override ``chat`` to observe or meter the calls (the gateway's token accounting,
    the rollout benchmark's request recorder).
    """

    def __init__(self, inner: LLMEngine) -> None:
        super().__init__()  # its policy_version = 0 is ignored: there is no inner engine yet
        self.inner = inner
        self.name = inner.name
        self.reports_token_ids = inner.reports_token_ids
        self.supports_structured_output = inner.supports_structured_output

    @property
    def policy_version(self) -> int:
        return self.inner.policy_version

    @policy_version.setter
    def policy_version(self, value: int) -> None:
        # LLMEngine.__init__ assigns 0 before a wrapper is complete; the version lives on the inner engine.
        if "inner" in self.__dict__:
            self.inner.policy_version = value

    async def chat(self, messages: list[dict[str, str]], settings: SamplingSettings) -> Generation:
        return await self.inner.chat(messages, settings)

    async def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], policy_version: int) -> None:
        await self.inner.load_weights(weights, policy_version)

    async def close(self) -> None:
        await self.inner.close()
