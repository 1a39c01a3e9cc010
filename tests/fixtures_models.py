"""Model and engine fixtures: the bundled model directory and one engine of each local kind.

Engines are expensive (a vLLM engine takes 25-50 s to start on 2 cores and holds ~1.5 GB), so
each lives for the whole session and every test shares it. Async tests that use an engine must
run in the *session* event loop, where the engine's background tasks live: set
``asyncio_default_test_loop_scope = "session"`` in pytest's config, or mark the module with
``pytestmark = pytest.mark.asyncio(loop_scope="session")``.

A test that changes an engine's weights must restore them (and the policy version) before it
ends; see ``tests/test_engines.py`` for the pattern.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from flowlane.runtime.engines.base import LLMEngine

BUNDLED_MODEL = "smollm2-135m-instruct"
# Agent prompts are ~1.5k tokens; 4096 leaves room for outputs while keeping the KV cache small.
TEST_MAX_MODEL_LEN = 4096


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct as a safetensors model directory (imported on first use)."""
    from flowlane.kit.models import resolve_model

    return resolve_model(BUNDLED_MODEL)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def vllm_engine(model_dir: Path) -> AsyncIterator[LLMEngine]:
    """One in-process vLLM engine (CPU, float32, 1 GiB KV cache, eager mode) for the session."""
    from flowlane.runtime.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(model_dir, max_model_len=TEST_MAX_MODEL_LEN, kv_cache_gib=1, max_num_seqs=32)
    try:
        yield engine
    finally:
        await engine.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def transformers_engine(model_dir: Path) -> AsyncIterator[LLMEngine]:
    """One batched transformers engine (float32) for the session.

    It computes on one thread (torch's setting is process-wide, so the rest of the session does
    too): the session's vLLM worker already keeps one of the two cores busy, and two OpenMP
    threads on a contended core stall each other (8x32 tokens: 6-23 s on one thread, over 300 s
    on two, measured on this machine under load).
    """
    from flowlane.runtime.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(model_dir, max_batch_size=16, num_threads=1)
    try:
        yield engine
    finally:
        await engine.close()
