"""vLLM in-process engine: the rollout engine, on GPU and (via ``vllm-cpu``) on CPU.

Why vLLM: many trajectories run at once and their planner, executor and verifier calls arrive
one by one; vLLM's continuous batching merges whatever is in flight into every forward step, so
concurrent ``chat`` calls share the model instead of queueing behind each other.

What this adapter adds on top of ``vllm.v1.engine.async_llm.AsyncLLM``:

- **Exact training records.** Prompts are built with the model's chat template
  (``flowlane.kit.models.encode_chat``) and submitted as token ids, so ``prompt_ids`` is
  exactly what the model saw. The engine runs with ``logprobs_mode="processed_logprobs"``: the
  log-prob of each sampled token is taken *after* temperature and top-p, i.e. under the
  distribution it was actually sampled from (what Flow-GRPO's ``pi_old`` is). With temperature 0
  (greedy) it is the log-prob under the unscaled distribution. With a JSON schema, the grammar
  mask is applied before sampling, so the log-prob is under the schema-constrained distribution;
  the generation records the schema (``Generation.json_schema``) so that the learner can re-score
  under the same mask (``flowlane.trainer.constrained``).
- **Structured output.** ``SamplingSettings.json_schema`` becomes vLLM structured outputs (the
  xgrammar backend for the planner's schema; ``engine_args`` must not set
  ``structured_outputs_config.disable_any_whitespace``, which the learner's replay assumes off).
- **Weight sync without restart.** ``load_weights`` writes the new tensors in buckets of whole
  layers (``WEIGHT_BUCKET_BYTES``), one safetensors file at a time, and asks the worker, through
  ``collective_rpc`` and the worker extension below, to load each into the running model; so
  staging never holds more than one bucket, whatever the model's size. Buckets go to
  ``/dev/shm`` when it has room for them (a pod's default ``/dev/shm`` is only 64 MiB) and to
  the temporary directory otherwise. Generation is paused first in ``wait`` mode, so in-flight
  requests finish under the old weights, and new ``chat`` calls wait until the version is
  bumped: every ``Generation`` was produced by exactly the ``policy_version`` it carries. NCCL is
  the GPU-cluster path.
- **LoRA adapters instead of weights.** Started with ``max_lora_rank`` (a LoRA run), the engine
  serves vLLM LoRA adapters: ``load_adapter`` stages a PEFT adapter directory (a few MB, not the
  model), adds it under a new integer id and removes the previous one, so one adapter is held at
  a time; from then on ``chat`` generates through it (``LoRARequest``). ``base_model()`` is a view
  of the same engine that never applies an adapter: the frozen modules (executor, verifier,
  generator) of a LoRA run use it, as in AgentFlow where only the planner is trained. vLLM's CPU
  build turns torch.compile off when LoRA is on; this engine runs eager on CPU anyway.

vLLM on CPU starts its engine core in a *spawned* process: a script that creates this engine must
guard its entry point with ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from flowlane.api.errors import ConfigError, EngineUnavailableError
from flowlane.kit.cpus import cgroup_cpu_limit, own_cpus
from flowlane.kit.lora import adapter_rank, write_adapter
from flowlane.kit.models import encode_chat
from flowlane.runtime.engines.base import Generation, LLMEngine, SamplingSettings, WrappedEngine, resolve_dtype

WORKER_EXTENSION = f"{__name__}.FlowlaneWorkerExtension"
GIB = 1 << 30


class FlowlaneWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); runs inside the worker process."""

    reload_weights: Any  # provided by the vLLM worker this class is mixed into

    def flowlane_load_weights_file(self, path: str) -> int:
        """Load HF-named tensors from a safetensors file into the running model; return the count.

        vLLM's in-place reload restores each layer to checkpoint layout, loads the new tensors and
        re-runs the layer's post-load processing (on CPU, linear weights are repacked for the
        kernels), so a plain ``model.load_weights`` would not do. A layer must be given all of its
        tensors (a full state dict, or whole layers); layers not mentioned keep their weights.
        """
        import logging

        from safetensors.torch import load_file

        tensors = load_file(path)
        # vLLM warns once per untouched layer and lists every untouched parameter name; for a
        # partial update (one layer, LoRA-merged subsets) that floods the log, so mute it here.
        quiet = [logging.getLogger(f"vllm.model_executor.model_loader.reload.{name}") for name in ("inplace",
                                                                                              "layerwise")]
        levels = [log.level for log in quiet]
        for log in quiet:
            log.setLevel(logging.ERROR)
        try:
            self.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        finally:
            for log, level in zip(quiet, levels, strict=True):
                log.setLevel(level)
        return len(tensors)


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


#: vLLM-CPU's OpenMP binding variable; a value the user set is always kept.
THREADS_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


def cpu_threads_bind(allowed: set[int], share: tuple[int, int] = (0, 1)) -> str:
    """The CPU list for ``VLLM_CPU_OMP_THREADS_BIND``: the CPUs the process may run on, or the
    ``share[0]``-th of ``share[1]`` equal parts of them.

    vLLM's own ``auto`` binding keeps one core per engine for the engine's scheduler process and
    gives the model's OpenMP threads the rest: on a 2-core machine one thread, and both engines of
    a rollout worker (the planner's and the frozen modules') on that same core. The scheduler is
    mostly idle. ``bench/cpu_binding.py`` measures a worker's rollout under each binding; two
    engines do best with half the CPUs each (``open_engines`` asks for that), one engine with all.
    """
    cpus = sorted(allowed)
    part, parts = share
    if not cpus:
        raise ConfigError("no CPU to bind the vLLM engine's threads to")
    if not 0 <= part < parts:
        raise ConfigError(f"cpu_share {share}: the part must be in [0, {parts})")
    count = len(cpus)
    chosen = cpus[part * count // parts:(part + 1) * count // parts] or [cpus[part % count]]
    return ",".join(str(cpu) for cpu in chosen)


@contextlib.contextmanager
def threads_bound(share: tuple[int, int]) -> Iterator[None]:
    """Set ``VLLM_CPU_OMP_THREADS_BIND`` while an engine starts (its processes read it then) when
    the process owns its CPUs and the user did not set it; afterwards the environment is as it was."""
    allowed = os.sched_getaffinity(0)
    if _cuda_available() or THREADS_BIND_ENV in os.environ or not own_cpus(allowed, cgroup_cpu_limit()):
        yield
        return
    os.environ[THREADS_BIND_ENV] = cpu_threads_bind(allowed, share)
    try:
        yield
    finally:
        os.environ.pop(THREADS_BIND_ENV, None)


#: KV cache when the caller names none on CPU: ample for the bundled 135M model at 64 sequences.
CPU_DEFAULT_KV_CACHE_GIB = 2.0
#: The LoRA ranks vLLM 0.32 sizes its adapter slots for (``LoRAConfig.max_lora_rank``).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_slot_rank(rank: int) -> int:
    """The smallest rank vLLM accepts as ``max_lora_rank`` that holds an adapter of rank ``rank``."""
    for slot in VLLM_LORA_RANKS:
        if rank <= slot:
            return slot
    raise ConfigError(f"model.lora.rank: {rank} is above the largest LoRA rank vLLM serves "
                      f"({VLLM_LORA_RANKS[-1]}); use a rank of at most {VLLM_LORA_RANKS[-1]}")


class VLLMEngine(LLMEngine):
    """An in-process vLLM ``AsyncLLM`` behind the ``LLMEngine`` interface.

    Construction starts the engine (tens of seconds on CPU) and blocks until it is ready.
    ``dtype`` "auto" is bfloat16 on GPUs and float32 on CPU, where it keeps log-probs within 1e-4
    of a float32 re-scoring by the learner (``resolve_dtype``; ``bench/engines.py``). ``kv_cache_gib`` bounds the KV
    cache (vLLM-CPU reads it from memory, not a fraction of a device; default on CPU:
    ``CPU_DEFAULT_KV_CACHE_GIB``); ``enforce_eager`` skips torch.compile, which on CPU costs
    minutes of start-up for little gain with small models. ``max_lora_rank`` (the run's LoRA rank)
    enables LoRA adapters (``load_adapter``); vLLM rounds it up to a rank it has slots for. On
    CPU the model's threads run on the ``cpu_share`` part of the process's CPUs (default: all of
    them; ``cpu_threads_bind``) unless ``VLLM_CPU_OMP_THREADS_BIND`` is set or a CPU quota says
    the CPUs are shared (``own_cpus``), where vLLM's own binding stays.
    """

    name = "vllm"
    reports_token_ids = True
    supports_structured_output = True

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "auto",
        max_model_len: int = 4096,
        max_num_seqs: int = 64,
        kv_cache_gib: float | None = None,
        enforce_eager: bool = True,
        seed: int = 0,
        max_lora_rank: int | None = None,
        cpu_share: tuple[int, int] = (0, 1),
        engine_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if not _cuda_available():
            # vLLM torch.compiles a few sampler helpers even in eager mode; on CPU that runs the C++
            # toolchain at the first request, and concurrent engines sharing the inductor cache
            # have produced broken kernels. The eager versions are as fast for small batches.
            os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.model_dir = Path(model_dir)
        args: dict[str, Any] = {
            "model": str(self.model_dir),
            "dtype": resolve_dtype(dtype),
            "max_model_len": max_model_len,
            "max_num_seqs": max_num_seqs,
            "enforce_eager": enforce_eager,
            "seed": seed,
            "logprobs_mode": "processed_logprobs",
            "worker_extension_cls": WORKER_EXTENSION,
            "disable_log_stats": True,
        }
        if not _cuda_available():
            # Chunked prefill splits a prompt over steps and throws away the token sampled after
            # each partial chunk, rewinding the request's seeded generator; a CPU generator has no
            # offset to rewind, and vLLM 0.32's worker dies on it ("CPU Generator does not use
            # offset"), taking the engine and every request in flight with it. It can happen whenever
            # the prompts waiting in one step exceed its token budget (a rollout worker's 32
            # concurrent trajectories did it on 2026-12-02). Whole prompts only, then: a step takes
            # the waiting prompts that fit and the rest wait for the next.
            args.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 4096))
            if kv_cache_gib is None:
                # Without an explicit size vLLM-CPU reserves 92% of the NUMA node and refuses to start
                # when the page cache has eaten into "available" memory (as after a large pip install).
                kv_cache_gib = CPU_DEFAULT_KV_CACHE_GIB
        if kv_cache_gib is not None:
            args["kv_cache_memory_bytes"] = int(kv_cache_gib * GIB)
        self.max_lora_rank = None if max_lora_rank is None else lora_slot_rank(max_lora_rank)
        if self.max_lora_rank is not None:
            # One adapter serves at a time; the cache holds two so that adding never evicts first.
            args.update(enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=1, max_cpu_loras=2)
        args.update(engine_args or {})
        try:
            with threads_bound(cpu_share):
                self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        except Exception as err:  # vLLM reports start-up failures as RuntimeError from a subprocess
            raise EngineUnavailableError(
                f"vLLM engine for {self.model_dir} failed to start ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else 'no message'}); see the log above"
            ) from err
        self._tokenizer = self._llm.get_tokenizer()
        self.max_model_len = int(self._llm.model_config.max_model_len)
        self._weights_ready: asyncio.Event | None = None
        self._weights_lock: asyncio.Lock | None = None
        self._closed = False
        self._adapter: Any = None  # the LoRARequest of the adapter in use, None for the base model
        self._adapter_dir: Path | None = None  # its staged PEFT directory (vLLM reads it on add)
        self._adapter_ids = 0  # vLLM wants an id per adapter that is never reused
        self.adapter_load_s = 0.0  # seconds the engine took to add the newest adapter

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_chat(self._tokenizer, messages)

    def _gate(self) -> asyncio.Event:
        # Created lazily so the engine can be built outside the event loop that later uses it.
        if self._weights_ready is None:
            self._weights_ready = asyncio.Event()
            self._weights_ready.set()
        return self._weights_ready

    def _sampling_params(self, settings: SamplingSettings, prompt_len: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        room = self.max_model_len - prompt_len
        if room < 1:
            raise ConfigError(
                f"prompt has {prompt_len} tokens but the vLLM engine's max_model_len is "
                f"{self.max_model_len}; shorten the prompt or raise max_model_len"
            )
        schema = schema_text(settings)
        structured = StructuredOutputsParams(json=schema) if schema else None
        return SamplingParams(
            max_tokens=min(settings.max_tokens, room),
            temperature=settings.temperature,
            top_p=settings.top_p,
            seed=settings.seed,
            stop=list(settings.stop) or None,
            logprobs=0,  # the sampled token's log-prob only
            flat_logprobs=True,
            structured_outputs=structured,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    async def chat(self, messages: list[dict[str, str]], settings: SamplingSettings) -> Generation:
        """Generate with the current policy: the newest adapter when one is loaded."""
        return await self._generate(messages, settings, with_adapter=True)

    def base_model(self) -> LLMEngine:
        """This engine without any adapter: the base model, never changed by ``load_adapter``."""
        return BaseModelView(self)

    async def _generate(self, messages: list[dict[str, str]], settings: SamplingSettings,
                        with_adapter: bool) -> Generation:
        from vllm.inputs import TokensPrompt

        if self._closed:
            raise EngineUnavailableError("the vLLM engine is closed; create a new one")
        prompt_ids = self.encode(messages)
        params = self._sampling_params(settings, len(prompt_ids))
        await self._gate().wait()  # never start a request while weights are being swapped
        # The base model is version 0's weights; full-weight loads change the base, adapters do not.
        adapter = self._adapter if with_adapter else None
        version = self.policy_version if with_adapter or self.max_lora_rank is None else 0
        final = None
        async for output in self._llm.generate(
            TokensPrompt(prompt_token_ids=prompt_ids), params, request_id=uuid.uuid4().hex, lora_request=adapter
        ):
            final = output
        if final is None or not final.outputs:
            raise EngineUnavailableError("the vLLM engine returned no output; it may have shut down")
        completion = final.outputs[0]
        token_ids = [int(token) for token in completion.token_ids]
        return Generation(
            prompt_ids=prompt_ids,
            token_ids=token_ids,
            logprobs=_sampled_logprobs(completion.logprobs, token_ids),
            text=completion.text,
            finish_reason=str(completion.finish_reason or "stop"),
            policy_version=version,
            json_schema=schema_text(settings),
        )

    async def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], policy_version: int) -> None:
        """Load HF-named tensors (full or partial state dict) into the running model."""
        from safetensors.torch import save_file

        if self._weights_lock is None:
            self._weights_lock = asyncio.Lock()
        tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in weights}
        if not tensors:
            raise ConfigError("load_weights got no tensors")
        buckets = weight_buckets(tensors, WEIGHT_BUCKET_BYTES)
        largest = max(sum(tensors[n].numel() * tensors[n].element_size() for n in b) for b in buckets)
        gate = self._gate()
        async with self._weights_lock:
            gate.clear()
            try:
                with tempfile.TemporaryDirectory(prefix="flowlane-weights-", dir=staging_dir(largest)) as tmp:
                    path = Path(tmp) / "bucket.safetensors"
                    await self._llm.pause_generation(mode="wait", clear_cache=True)
                    try:
                        for bucket in buckets:
                            part = {name: tensors.pop(name) for name in bucket}
                            await asyncio.to_thread(save_file, part, str(path))
                            del part
                            await self._llm.collective_rpc("flowlane_load_weights_file", args=(str(path),))
                            path.unlink()
                        await self._llm.reset_prefix_cache()
                    finally:
                        await self._llm.resume_generation()
                self.policy_version = policy_version
            finally:
                gate.set()

    async def load_adapter(self, adapter_config: str, tensors: Iterable[tuple[str, torch.Tensor]],
                           policy_version: int) -> int:
        """Serve a new LoRA adapter (PEFT names and ``adapter_config.json`` text) from now on; returns its bytes.

        Generation is paused in ``wait`` mode as for ``load_weights``: requests in flight finish
        with the previous adapter, new ones wait and then use this one, stamped ``policy_version``.
        The previous adapter is removed from the engine and its staged files deleted.
        """
        from vllm.lora.request import LoRARequest

        if self.max_lora_rank is None:
            raise ConfigError("load_adapter: this vLLM engine was started without LoRA; start it with "
                              "max_lora_rank (model.lora.enabled in a FlowRun)")
        rank = adapter_rank(adapter_config)
        if rank > self.max_lora_rank:
            raise ConfigError(f"the adapter's rank {rank} is above this engine's max_lora_rank "
                              f"{self.max_lora_rank}; start the engine with the run's model.lora.rank")
        if self._weights_lock is None:
            self._weights_lock = asyncio.Lock()
        state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors}
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        gate = self._gate()
        async with self._weights_lock:
            directory = Path(tempfile.mkdtemp(prefix=f"flowlane-adapter-v{policy_version}-",
                                              dir=staging_dir(nbytes)))
            try:
                await asyncio.to_thread(write_adapter, directory, adapter_config, state.items())
            except BaseException:
                shutil.rmtree(directory, ignore_errors=True)
                raise
            self._adapter_ids += 1
            request = LoRARequest(lora_name=f"policy-v{policy_version}-{self._adapter_ids}",
                                  lora_int_id=self._adapter_ids, lora_path=str(directory))
            gate.clear()
            try:
                await self._llm.pause_generation(mode="wait", clear_cache=False)
                try:
                    started = time.perf_counter()
                    try:
                        await self._llm.add_lora(request)
                    except Exception as err:
                        shutil.rmtree(directory, ignore_errors=True)
                        raise EngineUnavailableError(
                            f"vLLM refused the LoRA adapter of policy version {policy_version} "
                            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no message'})"
                        ) from err
                    self.adapter_load_s = time.perf_counter() - started
                    previous, previous_dir = self._adapter, self._adapter_dir
                    self._adapter, self._adapter_dir = request, directory
                    self.policy_version = policy_version
                    if previous is not None:
                        await self._llm.remove_lora(previous.lora_int_id)
                    if previous_dir is not None:
                        shutil.rmtree(previous_dir, ignore_errors=True)
                finally:
                    await self._llm.resume_generation()
            finally:
                gate.set()
        return nbytes

    async def loaded_adapters(self) -> set[int]:
        """The ids of the adapters vLLM holds now (one after any number of ``load_adapter`` calls)."""
        return set(await self._llm.list_loras())

    def num_unfinished_requests(self) -> int:
        """Requests in the engine now (running or waiting to be scheduled)."""
        return int(self._llm.get_num_unfinished_requests())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._llm.shutdown()
        if self._adapter_dir is not None:
            shutil.rmtree(self._adapter_dir, ignore_errors=True)
        # Drop the engine now: vLLM's own finaliser would otherwise run again at interpreter exit,
        # when the modules it needs are already torn down.
        del self._llm


class BaseModelView(WrappedEngine):
    """A LoRA engine's base model: the same vLLM engine, generating without an adapter.

    Its generations carry policy version 0 (the base weights never change in a LoRA run), and it
    cannot load weights or adapters: it is the frozen modules' engine.
    """

    def __init__(self, inner: VLLMEngine) -> None:
        super().__init__(inner)
        self.engine = inner

    async def chat(self, messages: list[dict[str, str]], settings: SamplingSettings) -> Generation:
        return await self.engine._generate(messages, settings, with_adapter=False)

    async def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], policy_version: int) -> None:
        raise ConfigError("the base model view of a LoRA engine is frozen; load adapters into the engine itself")

    async def close(self) -> None:
        """Nothing of its own to release: the engine it views is closed by its owner."""


def schema_text(settings: SamplingSettings) -> str:
    """The JSON schema of ``settings`` as the text vLLM compiles and the turn records ("" for none)."""
    return json.dumps(settings.json_schema) if settings.json_schema is not None else ""


#: Upper bound of one staged weight bucket; a single layer larger than this is staged alone.
WEIGHT_BUCKET_BYTES = 32 * 1024 * 1024

def weight_buckets(tensors: Mapping[str, torch.Tensor], bucket_bytes: int) -> list[list[str]]:
    """Tensor names in load order, grouped into buckets of whole layers of at most ``bucket_bytes``.

    vLLM's in-place reload needs every tensor of a layer in one call, so a transformer block
    (``...layers.N.*``) is never split; other tensors (embeddings, final norm, head) group by
    their module. A group larger than ``bucket_bytes`` becomes a bucket of its own.
    """
    from flowlane.kit.weights import layer_buckets

    return layer_buckets({n: t.numel() * t.element_size() for n, t in tensors.items()}, bucket_bytes)


def staging_dir(bucket_bytes: int, shm: Path = Path("/dev/shm")) -> str | None:
    """``/dev/shm`` when it has room for two buckets (RAM-backed, fastest), else the temp dir."""
    try:
        stat = os.statvfs(shm)
    except OSError:
        return None
    return str(shm) if stat.f_bavail * stat.f_frsize >= 2 * bucket_bytes else None


def _sampled_logprobs(logprobs: Any, token_ids: list[int]) -> list[float]:
    """The log-prob of each generated token from vLLM's per-position logprobs.

    With ``logprobs=0`` every position holds the sampled token (first) and nothing else; the
    lookup by token id keeps this correct if vLLM ever adds top-k entries.
    """
    if logprobs is None or len(logprobs) != len(token_ids):
        raise EngineUnavailableError(
            f"vLLM returned log-probs for {0 if logprobs is None else len(logprobs)} of "
            f"{len(token_ids)} tokens; the engine must run with logprobs enabled"
        )
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs
        values: list[float] = []
        for position, token in enumerate(token_ids):
            start, end = logprobs.start_indices[position], logprobs.end_indices[position]
            for index in range(start, end):
                if logprobs.token_ids[index] == token:
                    values.append(float(logprobs.logprobs[index]))
                    break
            else:
                raise EngineUnavailableError(f"vLLM log-probs lack the sampled token at position {position}")
        return values
    return [float(position[token].logprob) for position, token in zip(logprobs, token_ids, strict=True)]
