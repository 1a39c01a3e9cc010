"""LLM engines behind one interface: vLLM in-process, OpenAI-compatible HTTP, transformers."""

from flowlane.runtime.engines.base import Generation, LLMEngine, SamplingSettings

__all__ = ["Generation", "LLMEngine", "SamplingSettings"]
