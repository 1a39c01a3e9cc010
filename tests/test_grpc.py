"""The gRPC layer: stubs match the protos, calls need the token, big payloads travel in bounded chunks."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import pytest_asyncio
import torch

from flowlane.api import codegen, learner_pb2, learner_pb2_grpc, sandbox_pb2, sandbox_pb2_grpc
from flowlane.api.errors import ConfigError, FlowlaneError
from flowlane.api.trajectory import PlannerTurn, Step, StopReason, Trajectory, Verdict
from flowlane.kit import grpc_common
from flowlane.kit.grpc_common import (
    WeightStreamError,
    assemble_weights,
    assemble_weights_async,
    iter_trajectory_chunks,
    iter_weight_chunks,
    trajectory_from_record,
    trajectory_to_record,
)
from flowlane.runtime.sandbox.server import start_sandbox_server

TOKEN = "grpc-test-token"


# --- generated stubs ---


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    written = codegen.generate_protos(out_dir=tmp_path)

    assert sorted(p.name for p in written) == codegen.generated_names()
    for path in written:
        committed = codegen.API_DIR / path.name
        assert committed.read_text() == path.read_text(), f"{path.name} drifted: run `flowlane generate`"


def test_service_stubs_import_their_messages_package_relative() -> None:
    for name in ("learner_pb2_grpc.py", "sandbox_pb2_grpc.py"):
        text = (codegen.API_DIR / name).read_text()
        assert f"from . import {name.removesuffix('_grpc.py')} as" in text
        assert "\nimport learner_pb2" not in text and "\nimport sandbox_pb2" not in text


# --- auth, against the real Sandbox server ---


@pytest_asyncio.fixture(loop_scope="function")  # the loop the tests run in
async def sandbox_address() -> AsyncIterator[str]:
    server, port = await start_sandbox_server(port=0, token=TOKEN, max_concurrency=1)
    yield f"127.0.0.1:{port}"
    await server.stop(None)


async def health_code(address: str, token: str | None) -> grpc.StatusCode:
    channel = (grpc_common.open_channel(address, token) if token
               else grpc.aio.insecure_channel(address))  # a client that sends no token at all
    async with channel:
        try:
            await sandbox_pb2_grpc.SandboxStub(channel).Health(sandbox_pb2.HealthRequest(), timeout=10)
        except grpc.aio.AioRpcError as err:
            return err.code()
    return grpc.StatusCode.OK


async def test_call_without_token_is_refused_unauthenticated(sandbox_address: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(grpc_common.TOKEN_ENV, raising=False)
    assert await health_code(sandbox_address, None) is grpc.StatusCode.UNAUTHENTICATED


async def test_call_with_wrong_token_is_refused_unauthenticated(sandbox_address: str) -> None:
    assert await health_code(sandbox_address, "wrong-token") is grpc.StatusCode.UNAUTHENTICATED


async def test_call_with_the_right_token_is_served(sandbox_address: str) -> None:
    assert await health_code(sandbox_address, TOKEN) is grpc.StatusCode.OK


async def test_client_reads_the_token_from_a_file(sandbox_address: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")  # a mounted Secret ends with a newline
    monkeypatch.delenv(grpc_common.TOKEN_ENV, raising=False)
    monkeypatch.setenv(grpc_common.TOKEN_FILE_ENV, str(tmp_path / "token"))

    assert grpc_common.resolve_token() == TOKEN
    async with grpc_common.open_channel(sandbox_address) as channel:
        reply = await sandbox_pb2_grpc.SandboxStub(channel).Health(sandbox_pb2.HealthRequest(), timeout=10)
    assert reply.serving


def test_server_without_a_token_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(grpc_common.TOKEN_ENV, raising=False)
    monkeypatch.delenv(grpc_common.TOKEN_FILE_ENV, raising=False)
    with pytest.raises(ConfigError, match="no gRPC token: set FLOWLANE_GRPC_TOKEN"):
        grpc_common.create_server()


async def test_binding_a_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = grpc_common.create_server(TOKEN)
        with pytest.raises(FlowlaneError, match=f"cannot listen on 127.0.0.1:{port}: the port is in use"):
            grpc_common.bind_port(server, "127.0.0.1", port)


# --- weights ---


def sample_weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(33, 17, generator=gen),
        "layer.0.bf16": torch.randn(5, 7, 3, generator=gen).to(torch.bfloat16),
        "positions": torch.arange(-1000, 1000, dtype=torch.int64).reshape(40, 50),
        "scalar": torch.tensor(3.25),
        "empty": torch.empty(0, 4),
        "odd.bytes": torch.tensor([1, 2, 3], dtype=torch.int8),  # 3 bytes: the next tensor must be realigned
        "after.odd": torch.tensor([1.5, -2.5], dtype=torch.float64),
    }


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def test_weight_chunks_round_trip_exactly() -> None:
    weights = sample_weights()
    version, tensors = assemble_weights(iter_weight_chunks(weights, version=12, chunk_bytes=1000))

    assert version == 12
    assert_same_tensors(tensors, weights)


def test_weight_stream_is_a_header_then_data_chunks_of_bounded_size() -> None:
    chunks = list(iter_weight_chunks(sample_weights(), version=1, chunk_bytes=1000))
    data = [c.data for c in chunks[1:]]

    assert chunks[0].WhichOneof("payload") == "header"
    assert all(c.WhichOneof("payload") == "data" for c in chunks[1:])
    assert all(len(d) == 1000 for d in data[:-1]) and 0 < len(data[-1]) <= 1000
    assert sum(map(len, data)) == chunks[0].header.total_bytes
    assert [c.offset for c in chunks[1:]] == [i * 1000 for i in range(len(data))]
    assert all(e.offset % grpc_common.WEIGHT_ALIGNMENT_BYTES == 0 for e in chunks[0].header.tensors)


def test_weight_stream_with_a_missing_chunk_is_refused() -> None:
    chunks = list(iter_weight_chunks(sample_weights(), version=1, chunk_bytes=1000))

    with pytest.raises(WeightStreamError, match="weight stream gap: expected offset 1000, got 2000"):
        assemble_weights([chunks[0], chunks[1], *chunks[3:]])
    with pytest.raises(WeightStreamError, match=r"weight stream ended early: \d+ of \d+ bytes"):
        assemble_weights(chunks[:-1])


def test_weight_chunk_size_over_the_message_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="chunk_bytes must be in"):
        next(iter_weight_chunks(sample_weights(), 1, chunk_bytes=grpc_common.MAX_MESSAGE_BYTES))


# --- trajectories ---


def sample_trajectory(reward: float = 1.0) -> Trajectory:
    return Trajectory(
        question="What is 6 * 7?", question_id="q-7", gold_answer="42", query_analysis="arithmetic",
        steps=[Step(turn=0, tool_name="python", sub_goal="multiply", command="print(6*7)", result="42",
                    verdict=Verdict.STOP)],
        planner_turns=[PlannerTurn(prompt_ids=[1, 2, 3], response_ids=[7, 8], logprobs=[-0.125, -2.0000000001],
                                   policy_version=4, text="Tool Name: python"),
                       PlannerTurn(prompt_ids=[1, 2, 3, 7, 8, 9], response_ids=[11], logprobs=[-0.5],
                                   policy_version=5, text="done", parsed=False)],
        answer="42", reward=reward, stop_reason=StopReason.VERIFIER_STOP, tool_calls={"python": 1},
    )


def test_trajectory_round_trips_through_its_record() -> None:
    trajectory = sample_trajectory()
    record = trajectory_to_record(trajectory, "traj-1", worker_id="rollout-0")

    assert trajectory_from_record(record).to_dict() == trajectory.to_dict()
    assert [list(t.response_mask) for t in record.turns] == [[1, 1], [1]]
    assert "prompt_ids" not in json.loads(record.trajectory_json)["planner_turns"][0]  # not sent twice


def test_trajectory_without_reward_is_refused() -> None:
    trajectory = sample_trajectory()
    trajectory.reward = None
    with pytest.raises(ValueError, match="trajectory t: reward is None"):
        trajectory_to_record(trajectory, "t")


def test_trajectory_chunks_stay_under_their_byte_budget() -> None:
    records = [trajectory_to_record(sample_trajectory(), f"traj-{i:03d}") for i in range(50)]
    budget = 3 * (records[0].ByteSize() + 8)
    chunks = list(iter_trajectory_chunks(records, max_chunk_bytes=budget))

    assert [len(c.trajectories) for c in chunks] == [3] * 16 + [2]
    assert all(c.ByteSize() <= budget for c in chunks)
    assert [r.trajectory_id for c in chunks for r in c.trajectories] == [f"traj-{i:03d}" for i in range(50)]


# --- streams over a real channel: a minimal Learner ---


class TinyLearner(learner_pb2_grpc.LearnerServicer):
    """Just enough of a Learner to exercise the streaming RPC shapes through the auth layer."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.weights = weights
        self.seen: set[str] = set()

    async def GetWeights(self, request, context):
        for chunk in iter_weight_chunks(self.weights, version=request.min_version, chunk_bytes=request.chunk_bytes):
            yield chunk

    async def SubmitTrajectories(self, request_iterator, context):
        ack = learner_pb2.SubmitAck(policy_version=3)
        async for chunk in request_iterator:
            for record in chunk.trajectories:
                if record.trajectory_id in self.seen:
                    ack.duplicates += 1
                else:
                    self.seen.add(record.trajectory_id)
                    ack.accepted += 1
        return ack


@pytest_asyncio.fixture(loop_scope="function")  # the loop the tests run in
async def learner_address() -> AsyncIterator[str]:
    server = grpc_common.create_server(TOKEN)
    learner_pb2_grpc.add_LearnerServicer_to_server(TinyLearner(sample_weights()), server)
    port = grpc_common.bind_port(server, "127.0.0.1", 0)
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


async def test_weights_stream_over_grpc_and_reassemble_exactly(learner_address: str) -> None:
    async with grpc_common.open_channel(learner_address, TOKEN) as channel:
        stream = learner_pb2_grpc.LearnerStub(channel).GetWeights(
            learner_pb2.WeightsRequest(min_version=9, chunk_bytes=4096), timeout=30)
        version, tensors = await assemble_weights_async(stream)

    assert version == 9
    assert_same_tensors(tensors, sample_weights())


async def test_streaming_calls_without_token_are_refused(learner_address: str) -> None:
    async with grpc.aio.insecure_channel(learner_address) as channel:
        stub = learner_pb2_grpc.LearnerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as weights_refused:
            await assemble_weights_async(stub.GetWeights(learner_pb2.WeightsRequest(chunk_bytes=4096), timeout=10))
        with pytest.raises(grpc.aio.AioRpcError) as submit_refused:
            await stub.SubmitTrajectories(iter([learner_pb2.TrajectoryChunk()]), timeout=10)

    assert weights_refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert submit_refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert weights_refused.value.details() == "missing 'authorization: Bearer <token>' metadata"


async def test_submitted_trajectories_arrive_chunked_and_duplicates_are_acknowledged(learner_address: str) -> None:
    records = [trajectory_to_record(sample_trajectory(), f"traj-{i}") for i in range(5)]
    async with grpc_common.open_channel(learner_address, TOKEN) as channel:
        stub = learner_pb2_grpc.LearnerStub(channel)
        first = await stub.SubmitTrajectories(iter_trajectory_chunks(records, max_chunk_bytes=1), timeout=10)
        retry = await stub.SubmitTrajectories(iter_trajectory_chunks(records[3:]), timeout=10)

    assert (first.accepted, first.duplicates) == (5, 0)
    assert (retry.accepted, retry.duplicates) == (0, 2)
