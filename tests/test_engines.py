"""LLM engines: exact training records, structured output, weight sync, batching, HTTP errors.

vLLM tests share the session engine (``vllm_engine`` in ``fixtures_models.py``); tests that load
weights restore the original weights and policy version before they end.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from safetensors.torch import load_file

from flowlane.api.errors import ConfigError, EngineUnavailableError, ModelNotFoundError
from flowlane.kit.models import encode_chat
from flowlane.runtime.engines.base import Generation, LLMEngine, SamplingSettings, WrappedEngine, resolve_dtype
from flowlane.runtime.engines.factory import create_engine
from flowlane.runtime.engines.openai_engine import OpenAIEngine
from flowlane.runtime.engines.transformers_engine import TransformersEngine, _top_p_mask
from flowlane.runtime.engines.vllm_engine import VLLMEngine, cpu_threads_bind

# Engine fixtures live in the session event loop; async tests must run there too.
session_loop = pytest.mark.asyncio(loop_scope="session")

QUESTION = [{"role": "user", "content": "Name three colors of the rainbow."}]
PROBE_LAYER = "model.layers.0.mlp.down_proj.weight"  # zeroing it visibly changes the model


def rescore(model: Any, generation: Generation, temperature: float) -> torch.Tensor:
    """Reference log-probs: float32 forward over prompt + generated ids, log_softmax(logits / T)."""
    ids = torch.tensor([generation.prompt_ids + generation.token_ids])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].float()
    start = len(generation.prompt_ids) - 1
    positions = logits[start : start + len(generation.token_ids)]
    logprobs = torch.log_softmax(positions / temperature, dim=-1)
    return logprobs.gather(1, torch.tensor(generation.token_ids)[:, None]).squeeze(1)


def original_tensor(model_dir: Path, name: str) -> torch.Tensor:
    return load_file(str(model_dir / "model.safetensors"))[name]


# --- vLLM -----------------------------------------------------------------------------------------


@session_loop
async def test_vllm_generation_records_exact_prompt_ids_tokens_and_logprobs(vllm_engine: VLLMEngine) -> None:
    gen = await vllm_engine.chat(QUESTION, SamplingSettings(max_tokens=24, temperature=0.7, seed=3))

    assert gen.prompt_ids == encode_chat(vllm_engine.tokenizer, QUESTION)
    assert 0 < len(gen.token_ids) <= 24
    assert len(gen.logprobs) == len(gen.token_ids)
    assert all(lp <= 0.0 for lp in gen.logprobs)
    assert gen.text == vllm_engine.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
    assert gen.finish_reason in {"stop", "length"}
    assert gen.policy_version == vllm_engine.policy_version


@session_loop
async def test_vllm_same_seed_gives_same_tokens(vllm_engine: VLLMEngine) -> None:
    settings = SamplingSettings(max_tokens=16, temperature=1.0, seed=11)
    first, second = await asyncio.gather(vllm_engine.chat(QUESTION, settings), vllm_engine.chat(QUESTION, settings))
    assert first.token_ids == second.token_ids
    assert first.logprobs == pytest.approx(second.logprobs, abs=1e-5)


@session_loop
async def test_vllm_structured_output_validates_against_schema(vllm_engine: VLLMEngine) -> None:
    schema = {
        "type": "object",
        "properties": {"tool": {"type": "string", "enum": ["python", "search"]}, "reason": {"type": "string"}},
        "required": ["tool", "reason"],
        "additionalProperties": False,
    }
    messages = [{"role": "user", "content": "Which tool computes 17*23? Answer in JSON."}]
    gen = await vllm_engine.chat(messages, SamplingSettings(max_tokens=96, temperature=0.7, seed=5, json_schema=schema))

    assert gen.finish_reason == "stop"
    jsonschema.validate(json.loads(gen.text), schema)
    assert len(gen.logprobs) == len(gen.token_ids)


@session_loop
async def test_vllm_logprobs_agree_with_transformers_rescoring(
    vllm_engine: VLLMEngine, transformers_engine: TransformersEngine
) -> None:
    """vLLM's sampling log-probs equal a float32 transformers re-scoring of the same ids.

    Both run the same float32 weights; they differ only in kernels (vLLM's CPU paged attention and
    fused ops vs PyTorch eager) and in summation order, which moves a log-prob by ~1e-5 (observed
    on this machine over 123 tokens at T=0.7: max 4.1e-5, mean 3.9e-6).
    Tolerance: max 1e-3, mean 1e-4. That is ~25x the observed error, yet far below what a real
    bookkeeping bug produces (a missing temperature at T=0.7 shifts log-probs by 0.1-1; an
    off-by-one position or a wrong token id by whole nats) and below the 0.2 clip range of the
    Flow-GRPO ratio, whose log is what these numbers feed.
    """
    temperature = 0.7
    prompts = [
        [{"role": "user", "content": "Write one sentence about the sea."}],
        [{"role": "user", "content": "What is 12 + 30?"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Define entropy."}],
        [{"role": "user", "content": "List two prime numbers and explain why."}],
    ]
    gens = await asyncio.gather(
        *(
            vllm_engine.chat(p, SamplingSettings(max_tokens=48, temperature=temperature, seed=i))
            for i, p in enumerate(prompts)
        )
    )
    diffs = torch.cat(
        [(rescore(transformers_engine.model, g, temperature) - torch.tensor(g.logprobs)).abs() for g in gens]
    )
    print(f"vLLM vs transformers log-probs over {diffs.numel()} tokens: "
          f"max {diffs.max().item():.2e}, mean {diffs.mean().item():.2e}")
    assert diffs.numel() > 40
    assert diffs.max().item() < 1e-3
    assert diffs.mean().item() < 1e-4


@session_loop
async def test_vllm_concurrent_calls_run_together(vllm_engine: VLLMEngine) -> None:
    settings = SamplingSettings(max_tokens=32, temperature=0.7)
    tasks = [asyncio.create_task(vllm_engine.chat(QUESTION, settings)) for _ in range(8)]
    peak = 0
    while not all(t.done() for t in tasks):
        peak = max(peak, vllm_engine.num_unfinished_requests())
        await asyncio.sleep(0.005)
    gens = await asyncio.gather(*tasks)
    assert peak == 8  # all eight were in the engine at once, to be batched together
    assert all(len(g.token_ids) == len(g.logprobs) > 0 for g in gens)


@session_loop
async def test_vllm_load_weights_changes_outputs_and_policy_version(
    vllm_engine: VLLMEngine, model_dir: Path
) -> None:
    greedy = SamplingSettings(max_tokens=16, temperature=0.0)
    original = original_tensor(model_dir, PROBE_LAYER)
    version = vllm_engine.policy_version
    before = await vllm_engine.chat(QUESTION, greedy)
    try:
        await vllm_engine.load_weights([(PROBE_LAYER, torch.zeros_like(original))], policy_version=version + 1)
        changed = await vllm_engine.chat(QUESTION, greedy)
    finally:
        await vllm_engine.load_weights([(PROBE_LAYER, original)], policy_version=version)
    restored = await vllm_engine.chat(QUESTION, greedy)

    assert changed.policy_version == version + 1
    assert changed.token_ids != before.token_ids
    assert restored.token_ids == before.token_ids
    assert restored.policy_version == version


@session_loop
async def test_vllm_generation_started_during_weight_load_carries_the_version_that_made_it(
    vllm_engine: VLLMEngine, model_dir: Path
) -> None:
    greedy = SamplingSettings(max_tokens=12, temperature=0.0)
    original = original_tensor(model_dir, PROBE_LAYER)
    version = vllm_engine.policy_version
    old = await vllm_engine.chat(QUESTION, greedy)
    try:
        load = asyncio.create_task(
            vllm_engine.load_weights([(PROBE_LAYER, torch.zeros_like(original))], policy_version=version + 1)
        )
        await asyncio.sleep(0)  # the load has started: it holds the gate
        during = await vllm_engine.chat(QUESTION, greedy)
        await load
    finally:
        await vllm_engine.load_weights([(PROBE_LAYER, original)], policy_version=version)

    assert during.policy_version == version + 1
    assert during.token_ids != old.token_ids


# --- transformers ---------------------------------------------------------------------------------


@session_loop
async def test_transformers_batches_concurrent_calls_into_one_generate(
    transformers_engine: TransformersEngine,
) -> None:
    budgets = [4, 9, 16, 6, 12, 3]
    runs_before = len(transformers_engine.batch_sizes)
    gens = await asyncio.gather(
        *(
            transformers_engine.chat(QUESTION, SamplingSettings(max_tokens=n, temperature=0.7 + 0.05 * i))
            for i, n in enumerate(budgets)
        )
    )
    assert transformers_engine.batch_sizes[runs_before:] == [len(budgets)]
    for gen, budget in zip(gens, budgets, strict=True):
        assert gen.prompt_ids == transformers_engine.encode(QUESTION)
        assert 0 < len(gen.token_ids) == len(gen.logprobs) <= budget
        ended_by_eos = gen.token_ids[-1] == transformers_engine.eos_id
        assert gen.finish_reason == ("stop" if ended_by_eos else "length")
        assert ended_by_eos or len(gen.token_ids) == budget


@session_loop
async def test_transformers_logprobs_are_sampling_logprobs(transformers_engine: TransformersEngine) -> None:
    """Batched (left-padded) generation log-probs equal an unpadded re-scoring: same model, same
    float32 weights, so only padding-induced summation order differs (tolerance 1e-3)."""
    temperature = 0.8
    gens = await asyncio.gather(
        transformers_engine.chat(QUESTION, SamplingSettings(max_tokens=20, temperature=temperature, seed=1)),
        transformers_engine.chat(
            [{"role": "user", "content": "Hi"}], SamplingSettings(max_tokens=20, temperature=temperature)
        ),
    )
    for gen in gens:
        reference = rescore(transformers_engine.model, gen, temperature)
        assert torch.allclose(torch.tensor(gen.logprobs), reference, atol=1e-3)


@session_loop
async def test_transformers_load_weights_changes_outputs_and_policy_version(
    transformers_engine: TransformersEngine, model_dir: Path
) -> None:
    greedy = SamplingSettings(max_tokens=10, temperature=0.0)
    original = original_tensor(model_dir, PROBE_LAYER)
    version = transformers_engine.policy_version
    before = await transformers_engine.chat(QUESTION, greedy)
    try:
        await transformers_engine.load_weights([(PROBE_LAYER, torch.zeros_like(original))], version + 1)
        changed = await transformers_engine.chat(QUESTION, greedy)
    finally:
        await transformers_engine.load_weights([(PROBE_LAYER, original)], version)

    assert changed.policy_version == version + 1
    assert changed.token_ids != before.token_ids


@session_loop
async def test_transformers_load_weights_rejects_unknown_names(transformers_engine: TransformersEngine) -> None:
    with pytest.raises(ConfigError, match="do not exist in the model"):
        await transformers_engine.load_weights([("model.no_such.weight", torch.zeros(1))], 99)


def test_top_p_keeps_smallest_nucleus_reaching_p() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    masked = _top_p_mask(probs.log(), torch.tensor([0.8]))
    assert torch.isfinite(masked).tolist() == [[True, True, False, False]]
    assert torch.softmax(masked, dim=-1)[0, :2].tolist() == pytest.approx([0.625, 0.375])


# --- OpenAI-compatible HTTP ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ChatServer:
    """A loopback HTTP server speaking the chat-completions JSON shape; records requests."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                outer.requests.append((dict(self.headers), json.loads(self.rfile.read(length))))
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def chat_server() -> Iterator[ChatServer]:
    reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris"}, "finish_reason": "stop"}]}
    with ChatServer(200, reply) as server:
        yield server


@session_loop
async def test_openai_engine_sends_chat_request_and_returns_text(chat_server: ChatServer) -> None:
    engine = OpenAIEngine("frozen-7b", base_url=chat_server.url, api_key="sk-test")
    try:
        gen = await engine.chat(QUESTION, SamplingSettings(max_tokens=7, temperature=0.2, seed=4, stop=("\n",)))
    finally:
        await engine.close()

    assert (gen.text, gen.finish_reason, gen.token_ids, gen.logprobs) == ("Paris", "stop", [], [])
    assert engine.reports_token_ids is False
    headers, body = chat_server.requests[0]
    assert headers["Authorization"] == "Bearer sk-test"
    assert body == {
        "model": "frozen-7b", "messages": QUESTION, "max_tokens": 7, "temperature": 0.2,
        "top_p": 1.0, "seed": 4, "stop": ["\n"],
    }


@session_loop
async def test_openai_engine_reports_http_error_with_server_message() -> None:
    with ChatServer(401, {"error": {"message": "invalid api key"}}) as server:
        engine = OpenAIEngine("m", base_url=server.url, api_key="bad")
        try:
            with pytest.raises(EngineUnavailableError, match="HTTP 401: invalid api key"):
                await engine.chat(QUESTION, SamplingSettings(max_tokens=4))
        finally:
            await engine.close()


@session_loop
async def test_openai_engine_unreachable_endpoint_is_one_line_error_naming_url() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    engine = OpenAIEngine("m", base_url=url, timeout_s=5)
    try:
        with pytest.raises(EngineUnavailableError) as info:
            await engine.chat(QUESTION, SamplingSettings(max_tokens=4))
    finally:
        await engine.close()
    message = str(info.value)
    assert f"{url}/chat/completions" in message
    assert "\n" not in message


# --- factory --------------------------------------------------------------------------------------


def test_create_engine_unknown_kind_lists_kinds() -> None:
    with pytest.raises(ConfigError, match="unknown engine kind 'llamacpp'; choose one of: vllm, transformers, openai"):
        create_engine("llamacpp", "m")


def test_create_engine_unknown_option_names_accepted_options() -> None:
    with pytest.raises(ConfigError, match="unknown option 'base_uri' for the openai engine; accepted: base_url"):
        create_engine("openai", "m", base_uri="http://x")


def test_create_engine_missing_model_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-model"
    with pytest.raises(ModelNotFoundError, match=str(missing)):
        create_engine("transformers", str(missing))


@session_loop
async def test_create_engine_builds_openai_engine() -> None:
    engine = create_engine("OpenAI", "m", base_url="http://127.0.0.1:1/v1")
    try:
        assert isinstance(engine, OpenAIEngine)
        assert engine.url == "http://127.0.0.1:1/v1/chat/completions"
    finally:
        await engine.close()


class _VersionedEngine(LLMEngine):
    name = "versioned"
    supports_structured_output = True

    def __init__(self) -> None:
        super().__init__()
        self.loaded: list[int] = []
        self.closed = False

    async def chat(self, messages: list[dict[str, str]], settings: SamplingSettings) -> Generation:
        return Generation(text=messages[-1]["content"].upper(), prompt_ids=[1], token_ids=[2], logprobs=[-0.5])

    async def load_weights(self, weights, policy_version: int) -> None:  # type: ignore[no-untyped-def]
        self.loaded.append(policy_version)
        self.policy_version = policy_version

    async def close(self) -> None:
        self.closed = True


async def test_a_wrapped_engine_passes_calls_through_and_shares_the_policy_version() -> None:
    inner = _VersionedEngine()
    inner.policy_version = 7
    wrapper = WrappedEngine(inner)  # wrapping does not reset the inner engine's version
    assert wrapper.policy_version == 7 and wrapper.name == "versioned" and wrapper.supports_structured_output
    generation = await wrapper.chat([{"role": "user", "content": "hi"}], SamplingSettings(max_tokens=4))
    assert generation.text == "HI"
    await wrapper.load_weights([], 8)
    assert inner.loaded == [8] and wrapper.policy_version == 8
    wrapper.policy_version = 9
    assert inner.policy_version == 9
    await wrapper.close()
    assert inner.closed


def test_auto_dtype_is_bfloat16_only_on_a_gpu_that_has_it() -> None:
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert resolve_dtype("auto") == ("bfloat16" if gpu_bf16 else "float32")
    assert [resolve_dtype(d) for d in ("float32", " BFloat16", "float16")] == ["float32", "bfloat16", "float16"]
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'; choose one of: auto, float32"):
        resolve_dtype("fp8")


async def test_transformers_engine_seed_makes_unseeded_requests_reproducible(model_dir: Path) -> None:
    """``seed`` is the engine-wide default (as for vLLM), so a FlowRun or `flowlane eval` can pass
    the same options to either engine."""
    settings = SamplingSettings(max_tokens=12, temperature=1.0)
    runs = []
    for _ in range(2):
        engine = TransformersEngine(model_dir, seed=11, max_batch_size=1)
        try:
            runs.append((await engine.chat(QUESTION, settings)).token_ids)
        finally:
            await engine.close()
    assert runs[0] == runs[1] and len(runs[0]) > 0


def test_weight_buckets_keep_each_layer_whole_and_stay_under_the_bound() -> None:
    from flowlane.runtime.engines.vllm_engine import weight_buckets

    def t(n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.float32)  # 4 bytes per element

    tensors = {
        "model.embed_tokens.weight": t(100),                 # 400 B
        "model.layers.0.self_attn.q_proj.weight": t(50),     # layer 0: 400 B in all
        "model.layers.0.mlp.up_proj.weight": t(50),
        "model.layers.1.self_attn.q_proj.weight": t(50),     # layer 1: 400 B
        "model.layers.1.mlp.up_proj.weight": t(50),
        "model.layers.10.mlp.up_proj.weight": t(300),        # layer 10: 1200 B, over the bound
        "model.norm.weight": t(10),                          # 40 B
    }
    assert weight_buckets(tensors, 800) == [
        ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"],
        ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"],
        ["model.layers.10.mlp.up_proj.weight"],
        ["model.norm.weight"],
    ]


def test_weights_stage_in_shm_only_when_it_holds_two_buckets(tmp_path: Path) -> None:
    import os

    from flowlane.runtime.engines.vllm_engine import staging_dir

    stat = os.statvfs(tmp_path)
    free = stat.f_bavail * stat.f_frsize
    assert staging_dir(free // 2 - 1, shm=tmp_path) == str(tmp_path)
    assert staging_dir(free, shm=tmp_path) is None
    assert staging_dir(1, shm=tmp_path / "missing") is None



def test_threads_bind_to_every_allowed_cpu_or_to_a_share_of_them() -> None:
    assert cpu_threads_bind({3, 0, 1}) == "0,1,3"
    assert [cpu_threads_bind({0, 1}, (part, 2)) for part in (0, 1)] == ["0", "1"]
    assert [cpu_threads_bind(set(range(5)), (part, 2)) for part in (0, 1)] == ["0,1", "2,3,4"]
    assert [cpu_threads_bind({7}, (part, 2)) for part in (0, 1)] == ["7", "7"]  # one CPU: shared
    with pytest.raises(ConfigError, match="no CPU"):
        cpu_threads_bind(set())
    with pytest.raises(ConfigError, match="cpu_share"):
        cpu_threads_bind({0, 1}, (2, 2))





@session_loop
async def test_vllm_model_threads_run_on_every_cpu_of_the_process(vllm_engine: VLLMEngine) -> None:
    """vLLM's own ``auto`` binding would leave the model one thread on a 2-core machine."""
    import psutil

    assert vllm_engine is not None
    allowed = set(os.sched_getaffinity(0))
    workers = [p for p in psutil.Process().children(recursive=True) if p.name().startswith("VLLM::Worker")]
    assert workers, "no vLLM worker process under this one"
    bound: set[int] = set()
    for worker in workers:
        for thread in worker.threads():
            bound |= set(psutil.Process(thread.id).cpu_affinity() or [])
    assert bound == allowed


@session_loop
async def test_seeded_prompts_beyond_one_steps_token_budget_do_not_kill_the_engine(vllm_engine: VLLMEngine) -> None:
    """vLLM 0.32's CPU worker died when chunked prefill split a seeded request's prompt ("CPU
    Generator does not use offset"): here 12 prompts of ~900 tokens arrive at once, three times
    a step's 4,096-token budget. The engine now prefills whole prompts only."""
    filler = " ".join(f"item{i}" for i in range(450))
    settings = SamplingSettings(max_tokens=4, temperature=0.7, seed=5)
    gens = await asyncio.gather(*(
        vllm_engine.chat([{"role": "user", "content": f"{i}: {filler}. Which item came first?"}], settings)
        for i in range(12)))
    assert all(len(g.prompt_ids) > 700 and g.token_ids for g in gens)
    again = await vllm_engine.chat(QUESTION, SamplingSettings(max_tokens=8, temperature=0.0))
    assert again.token_ids  # the engine is still alive
