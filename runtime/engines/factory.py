"""Build an engine from a kind name and options (config files, CLI flags).

The one place that maps ``--engine vllm`` or a spec's ``engine: {kind: vllm, ...}`` to a class.
Engine modules are imported only when chosen: asking for the HTTP engine must not import vLLM.
Options are checked against the engine's constructor so a typo is a one-line ``ConfigError``
naming the accepted options, not a ``TypeError`` from deep inside.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from flowlane.api.enums import LOCAL_ENGINE_KINDS, EngineKind
from flowlane.api.errors import ConfigError
from flowlane.runtime.engines.base import LLMEngine

_CLASSES: dict[EngineKind, tuple[str, str]] = {
    EngineKind.VLLM: ("flowlane.runtime.engines.vllm_engine", "VLLMEngine"),
    EngineKind.TRANSFORMERS: ("flowlane.runtime.engines.transformers_engine", "TransformersEngine"),
    EngineKind.OPENAI: ("flowlane.runtime.engines.openai_engine", "OpenAIEngine"),
}
# Kinds that load weights from a local model directory (resolved with resolve_model).
LOCAL_KINDS = LOCAL_ENGINE_KINDS


def parse_kind(kind: str) -> EngineKind:
    try:
        return EngineKind(kind.strip().lower())
    except ValueError:
        raise ConfigError(
            f"unknown engine kind {kind!r}; choose one of: {', '.join(k.value for k in EngineKind)}"
        ) from None


def engine_class(kind: EngineKind) -> type[LLMEngine]:
    module, name = _CLASSES[kind]
    cls: type[LLMEngine] = getattr(importlib.import_module(module), name)
    return cls


def create_engine(kind: str, model: str, **options: Any) -> LLMEngine:
    """Create an engine. ``model``: a model directory or known name for local kinds (vllm,
    transformers), the served model name for ``openai``. ``options`` go to the engine class."""
    engine_kind = parse_kind(kind)
    cls = engine_class(engine_kind)
    accepted = [
        name for name, param in inspect.signature(cls.__init__).parameters.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(accepted))
    construct: Callable[..., LLMEngine] = cls  # the base declares no constructor; each kind takes the model first
    if unknown:
        raise ConfigError(
            f"unknown option {unknown[0]!r} for the {engine_kind.value} engine; "
            f"accepted: {', '.join(accepted) or '(none)'}"
        )
    if engine_kind in LOCAL_KINDS:
        from flowlane.kit.models import resolve_model

        return construct(resolve_model(model), **options)
    return construct(model, **options)


#: The ``cpu_share`` of the planner's and of the frozen modules' vLLM engine when a process runs
#: both: they compute side by side, so each gets half the CPUs (``bench/cpu_binding.py``).
PAIR_CPU_SHARES = ((0, 2), (1, 2))


async def open_engines(kind: str, planner: str, fixed: str | None = None, *,
                       create: Callable[..., Any] = create_engine,
                       **options: Any) -> tuple[LLMEngine, LLMEngine]:
    """The planner's engine and the engine of the frozen modules (executor, verifier, generator):
    a second engine when ``fixed`` names a model, else the planner's own. Two vLLM engines split
    the CPUs between them (``cpu_share``; on a GPU it has no effect).

    Each is built in a worker thread (engines take seconds to minutes to start), so the caller's
    event loop keeps answering meanwhile; if the second fails, the first is closed, not leaked.
    """
    if not fixed:
        planner_engine = await asyncio.to_thread(create, kind, planner, **options)
        return planner_engine, planner_engine
    shares = [{"cpu_share": share} if kind == "vllm" else {} for share in PAIR_CPU_SHARES]
    planner_engine = await asyncio.to_thread(create, kind, planner, **options, **shares[0])
    try:
        return planner_engine, await asyncio.to_thread(create, kind, fixed, **options, **shares[1])
    except BaseException:
        await planner_engine.close()
        raise


async def close_engines(planner: LLMEngine, fixed: LLMEngine) -> None:
    """Close what ``open_engines`` returned (the fixed engine may be the planner's)."""
    try:
        await planner.close()
    finally:
        if fixed is not planner:
            await fixed.close()
