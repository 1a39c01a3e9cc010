"""LLM engines behind one interface: vLLM in-process, OpenAI-compatible HTTP, transformers.

Build one with ``create_engine(kind, model, **options)``; the engine modules themselves
(``vllm_engine``, ``transformers_engine``, ``openai_engine``) are imported only when chosen.
"""

from flowlane.runtime.engines.base import Generation, LLMEngine, SamplingSettings
from flowlane.runtime.engines.factory import EngineKind, create_engine

__all__ = ["EngineKind", "Generation", "LLMEngine", "SamplingSettings", "create_engine"]
