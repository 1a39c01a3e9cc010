"""A rollout worker: the FlowRun component that turns questions into scored trajectories.

It holds one inference engine (vLLM by default) with the current planner weights and loops:
ask the learner for work, bring its engine to the policy version the work must be sampled with
(pulling the weights as a chunked gRPC stream and loading them into the running engine, no
restart), run the agent on every assigned unit concurrently so the engine batches them, score
each answer, and stream the trajectories back. Tool code runs in the sandbox servers over gRPC
when their addresses are given (the FlowRun graph), in a local sandbox otherwise.

In a LoRA run on vLLM (``model.lora.enabled``) a policy version is the adapter alone: the engine
starts with LoRA enabled (``max_lora_rank`` = the run's rank), each sync loads the new adapter
(a few MB) next to the base weights it already holds, and the planner generates through it; the
frozen modules (executor, verifier, generator) use the same engine's base model, without the
adapter, unless ``model.fixed`` gives them an engine of their own.

The worker keeps no state worth saving: if it dies, the learner hands its units to another
worker (or to its own restarted process) and a unit is counted once, whoever fills it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import typer

from flowlane.kit import logs

log = logging.getLogger("flowlane.rollout")
T = TypeVar("T")


#: The worker's log line for each policy version it loads (``_sync``), as tools read it back
#: (bench/flowrun.py): version, what was synced, MB, seconds, MB/s, seconds inside the engine.
SYNC_LOG_FORMAT = "loaded policy version %d (%s, %.1f MB in %.2f s, %.1f MB/s; engine %.2f s)"
SYNC_LOG_PATTERN = re.compile(r"loaded policy version (\d+) \(([^,]+), ([\d.]+) MB in ([\d.]+) s, "
                              r"([\d.]+) MB/s; engine ([\d.]+) s\)")


@dataclass
class WorkerStats:
    trajectories: int = 0
    weight_syncs: int = 0
    weight_sync_s: float = 0.0
    weight_bytes: int = 0
    weight_load_s: float = 0.0  # of weight_sync_s: inside the engine's load calls
    adapter_syncs: int = 0  # syncs that loaded a LoRA adapter, not weights


@dataclass
class Synced:
    """One weight sync: the version loaded, its bytes, whether it was an adapter, the engine's share."""

    version: int
    nbytes: int
    adapter: bool
    engine_s: float


async def pull_weights(stub: Any, engine: Any, version: int) -> Synced:
    """Stream version >= ``version`` from the learner's ``GetWeights`` into ``engine``.

    Full weights go in bucket by bucket as each arrives (whole layers; a sync holds about one
    bucket). A LoRA adapter (the header carries its config) is gathered whole, a few MB, and
    loaded with ``engine.load_adapter``.
    """
    from flowlane.api import learner_pb2
    from flowlane.kit.weights import BucketAssembler

    assembler = BucketAssembler()
    nbytes, engine_s = 0, 0.0
    adapter: dict[str, Any] = {}
    async for chunk in stub.GetWeights(learner_pb2.WeightsRequest(min_version=version)):
        for bucket in assembler.feed(chunk):
            nbytes += sum(t.numel() * t.element_size() for t in bucket.values())
            if assembler.adapter_config:  # buckets share one buffer: keep copies
                adapter.update((name, tensor.clone()) for name, tensor in bucket.items())
            else:
                started = time.perf_counter()
                await engine.load_weights(bucket.items(), assembler.version)
                engine_s += time.perf_counter() - started
            del bucket
    assembler.finish()
    if assembler.adapter_config:
        started = time.perf_counter()
        await engine.load_adapter(assembler.adapter_config, adapter.items(), assembler.version)
        engine_s += time.perf_counter() - started
    return Synced(assembler.version, nbytes, bool(assembler.adapter_config), engine_s)


async def fetch_weights(store: Any, engine: Any, version: int) -> Synced:
    """Load version ``version`` from the weights store into ``engine``: a LoRA adapter whole, full
    weights bucket by bucket (whole layers); nothing runs on the engine meanwhile (the worker syncs
    between waves)."""
    from flowlane.kit.weights import fetch_adapter, fetch_version

    adapter = await asyncio.to_thread(fetch_adapter, store, version)
    if adapter is not None:
        config_text, tensors = adapter
        started = time.perf_counter()
        await engine.load_adapter(config_text, tensors.items(), version)
        return Synced(version, sum(t.numel() * t.element_size() for t in tensors.values()), True,
                      time.perf_counter() - started)
    buckets = fetch_version(store, version)
    nbytes, engine_s = 0, 0.0
    while (bucket := await asyncio.to_thread(next, buckets, None)) is not None:
        nbytes += sum(t.numel() * t.element_size() for t in bucket.values())
        started = time.perf_counter()
        await engine.load_weights(bucket.items(), version)
        engine_s += time.perf_counter() - started
        del bucket
    return Synced(version, nbytes, False, engine_s)


class RolloutWorker:
    def __init__(self, flowrun: Any, learner_address: str, sandbox_addresses: list[str],
                 worker_id: str, token: str | None) -> None:
        self.flowrun = flowrun
        self.spec = flowrun.spec
        self.learner_address = learner_address
        self.sandbox_addresses = sandbox_addresses
        # A new incarnation id per process start: the learner releases the leases of an old one.
        self.worker_id = f"{worker_id}/{uuid.uuid4().hex[:8]}"
        self.token = token
        self.stats = WorkerStats()
        self.learner_wait_s = 600.0  # how long a restarting learner may stay unreachable
        self._stopping = asyncio.Event()
        self._weights_store: Any = None

    async def run(self) -> None:
        from flowlane.api import learner_pb2, learner_pb2_grpc
        from flowlane.kit.grpc_common import open_channel
        from flowlane.runtime.agent.agent import Agent
        from flowlane.runtime.engines.factory import close_engines, open_engines
        from flowlane.runtime.tools.registry import build_tools

        spec = self.spec
        engine, opened_fixed = await open_engines(spec.engine.kind.value, spec.model.planner, spec.model.fixed,
                                                  **engine_options(spec))
        fixed = opened_fixed
        if opened_fixed is engine and lora_adapters(spec):
            from flowlane.runtime.engines.vllm_engine import VLLMEngine

            if isinstance(engine, VLLMEngine):
                fixed = engine.base_model()  # the frozen modules never see the planner's adapter
        runner = self._code_runner()
        tools = build_tools([t.name for t in spec.tools], engine=fixed, code_runner=runner)
        train_cfg, eval_cfg = agent_configs(spec)
        agents = {False: Agent(engine, fixed, tools, train_cfg), True: Agent(engine, fixed, tools, eval_cfg)}
        channel = open_channel(self.learner_address, self.token)
        stub = learner_pb2_grpc.LearnerStub(channel)
        log.info("worker %s ready (engine %s, fixed modules on %s, tools %s)", self.worker_id, engine.name,
                 f"a frozen {spec.model.fixed}" if spec.model.fixed
                 else "the planner's base model" if fixed is not engine else "the planner's engine",
                 [t.name for t in tools])
        try:
            while not self._stopping.is_set():
                batch = await self._call_learner(
                    lambda: stub.GetTasks(learner_pb2.TaskRequest(worker_id=self.worker_id, max_tasks=0)))
                if batch.done:
                    log.info("learner reports the run is done; exiting")
                    return
                if not batch.tasks:
                    await asyncio.sleep(0.2)
                    continue
                if batch.policy_version > engine.policy_version:
                    await self._call_learner(
                        functools.partial(self._sync_weights, stub, engine, batch.policy_version))
                records = await self._roll_out(agents, batch.tasks, engine.policy_version)
                await self._call_learner(functools.partial(self._submit, stub, records))
        finally:
            await channel.close()
            for tool in tools:
                await tool.close()
            await close_engines(engine, opened_fixed)

    def stop(self) -> None:
        self._stopping.set()

    async def _call_learner(self, call: Callable[[], Awaitable[T]]) -> T:
        """Retry while the learner is unreachable (it restarts from its checkpoint after a crash)."""
        import grpc

        deadline = time.monotonic() + self.learner_wait_s
        delay = 0.5
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                log.warning("learner at %s unavailable; retrying in %.1fs", self.learner_address, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _code_runner(self) -> Any:
        if self.sandbox_addresses:
            from flowlane.runtime.sandbox.server import RemoteCodeRunner

            index = abs(hash(self.worker_id)) % len(self.sandbox_addresses)
            return RemoteCodeRunner(self.sandbox_addresses[index], self.token)
        from flowlane.runtime.sandbox.runner import LocalCodeRunner

        return LocalCodeRunner()

    async def _sync_weights(self, stub: Any, engine: Any, version: int) -> None:
        from flowlane.kit.weights import checkpoint_root, open_weights_store

        started = time.perf_counter()
        if self.spec.engine.weight_sync.value == "store":
            if self._weights_store is None:
                run_dir = Path(os.environ.get("FLOWLANE_RUN_DIR", "."))
                self._weights_store = await asyncio.to_thread(
                    open_weights_store, checkpoint_root(self.spec.storage.checkpoint_uri, run_dir),
                    self.spec.storage.s3_endpoint or os.environ.get("FLOWLANE_S3_ENDPOINT"))
            synced = await fetch_weights(self._weights_store, engine, version)
        else:
            synced = await pull_weights(stub, engine, version)
        logs.set_context(policy_version=synced.version)
        took = time.perf_counter() - started
        self.stats.weight_syncs += 1
        self.stats.weight_sync_s += took
        self.stats.weight_bytes += synced.nbytes
        self.stats.weight_load_s += synced.engine_s
        self.stats.adapter_syncs += int(synced.adapter)
        log.info(SYNC_LOG_FORMAT, synced.version,
                 "LoRA adapter" if synced.adapter else "weights", synced.nbytes / 1e6, took,
                 synced.nbytes / 1e6 / max(took, 1e-9), synced.engine_s)

    async def _roll_out(self, agents: dict[bool, Any], tasks: Any, version: int) -> list[Any]:
        from flowlane.api.errors import ConfigError
        from flowlane.kit.grpc_common import trajectory_to_record
        from flowlane.runtime.rewards import score

        async def one(task: Any) -> Any:
            agent = agents[bool(task.eval)]
            traj = await agent.run(task.question, question_id=task.question_id, gold_answer=task.answer,
                                   seed=int(task.seed))
            try:
                traj.reward = score(task.reward_kind, traj.answer, task)
            except ConfigError as err:  # e.g. reward judge: the spec and the learner refuse it; never crash here
                log.error("task %s cannot be scored (%s); its trajectory gets reward 0", task.question_id, err)
                traj.reward = 0.0
            return trajectory_to_record(traj, task.unit_id, self.worker_id)

        records = list(await asyncio.gather(*(one(t) for t in tasks)))
        self.stats.trajectories += len(records)
        return records

    async def _submit(self, stub: Any, records: list[Any]) -> None:
        from flowlane.kit.grpc_common import iter_trajectory_chunks

        async def chunks() -> Any:
            for chunk in iter_trajectory_chunks(records):
                yield chunk

        ack = await stub.SubmitTrajectories(chunks())
        if ack.rejected:
            log.warning("learner rejected %d trajectories: %s", ack.rejected, "; ".join(ack.reasons[:3]))


def agent_configs(spec: Any) -> tuple[Any, Any]:
    """The agent settings of training units (the planner sampled at ``algorithm.temperature``,
    ``maxTurns``) and of evaluation units (greedy, ``schedule.evalMaxTurns``); both keep the
    verifier away for ``algorithm.minTurns`` turns."""
    from flowlane.runtime.agent.agent import AgentConfig
    from flowlane.runtime.engines.base import SamplingSettings

    algo = spec.algorithm
    planner = SamplingSettings(max_tokens=algo.max_planner_tokens, temperature=algo.temperature)
    train = AgentConfig.for_training(max_turns=algo.max_turns, min_turns=algo.min_turns, planner=planner)
    evaluation = replace(train, max_turns=spec.schedule.eval_max_turns,
                         planner=SamplingSettings(max_tokens=algo.max_planner_tokens, temperature=0.0))
    return train, evaluation


def lora_adapters(spec: Any) -> bool:
    """Whether this run's policy versions are LoRA adapters (LoRA on vLLM; see ``kit.weights``)."""
    from flowlane.kit.weights import adapter_sync

    return adapter_sync(spec.model.lora.enabled, spec.engine.kind.value)


def engine_options(spec: Any) -> dict[str, Any]:
    """Engine settings from the spec: the weight dtype and seed; for vLLM the context length,
    LoRA (its rank) in a LoRA run and, on CPU, a fixed KV-cache size, on GPU a memory fraction."""
    import torch

    options: dict[str, Any] = {"dtype": spec.model.dtype.value, "seed": spec.algorithm.seed}
    if spec.engine.kind.value == "vllm":
        options["max_model_len"] = spec.engine.max_model_len
        if lora_adapters(spec):
            options["max_lora_rank"] = spec.model.lora.rank
        if torch.cuda.is_available():
            engines = 2 if spec.model.fixed else 1  # both engines of a worker share its GPUs
            options["engine_args"] = {"gpu_memory_utilization": spec.engine.gpu_memory_utilization / engines,
                                      "tensor_parallel_size": spec.engine.tensor_parallel_size}
        else:
            options["kv_cache_gib"] = 1.0
    return options


async def _main(config: Path, learner: str, sandboxes: list[str], worker_id: str) -> None:
    from flowlane.api.flowrun import load_flowrun
    from flowlane.kit.grpc_common import resolve_token

    worker = RolloutWorker(load_flowrun(config), learner, sandboxes, worker_id, resolve_token())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()


def rollout(
    config: Path = typer.Option(..., "--config", help="The rendered FlowRun (run config YAML)."),
    learner: str = typer.Option(..., "--learner", help="Learner gRPC address host:port."),
    sandbox: list[str] = typer.Option([], "--sandbox", help="Sandbox gRPC address; repeat for several."),
    worker_id: str = typer.Option(os.environ.get("FLOWLANE_COMPONENT") or os.environ.get("HOSTNAME", "rollout"),
                                  "--worker-id",
                                  help="Stable name of this worker (its pod or component name)."),
    log_format: str | None = typer.Option(None, "--log-format", help=logs.LOG_FORMAT_HELP),
) -> None:
    """Run a rollout worker until the learner says the run is done."""
    logs.configure("rollout", log_format=log_format)
    logs.set_context(worker=worker_id)
    asyncio.run(_main(config, learner, sandbox, worker_id))
