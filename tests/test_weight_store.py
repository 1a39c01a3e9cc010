"""weightSync: store -- the learner writes each policy version once, workers fetch it bucket by bucket."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from flowlane.api.flowrun import load_flowrun
from flowlane.kit.checkpoints import CheckpointStore
from flowlane.kit.weights import (
    checkpoint_root,
    fetch_version,
    layer_buckets,
    open_weights_store,
    publish_version,
    weights_store_uri,
)

HEADER = "apiVersion: flowlane.dev/v1alpha1\nkind: FlowRun\nmetadata: {name: demo}\n"


def tiny_state(layers: int = 3, hidden: int = 16) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = {"model.embed_tokens.weight": torch.randn(32, hidden)}
    for i in range(layers):
        state[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(hidden, hidden)
        state[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(2 * hidden, hidden)
        state[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(hidden)
    state["model.norm.weight"] = torch.randn(hidden)
    return state


def test_buckets_hold_whole_layers_in_order_and_pack_up_to_the_limit() -> None:
    sizes = {"embed.weight": 100, "model.layers.0.a": 40, "model.layers.0.b": 40, "model.layers.1.a": 80,
             "model.layers.2.a": 300, "norm.weight": 10}
    assert layer_buckets(sizes, 200) == [["embed.weight", "model.layers.0.a", "model.layers.0.b"],
                                         ["model.layers.1.a"], ["model.layers.2.a"], ["norm.weight"]]


def test_published_versions_sit_next_to_the_checkpoints() -> None:
    assert weights_store_uri("file:///runs/a/checkpoints") == "file:///runs/a/checkpoints-weights"
    assert weights_store_uri("s3://bucket/runs/a/") == "s3://bucket/runs/a-weights"
    assert weights_store_uri("s3://bucket") == "s3://bucket/weights"
    assert checkpoint_root(None, Path("/runs/a")) == "file:///runs/a/checkpoints"
    assert checkpoint_root("s3://b/p", Path("/runs/a")) == "s3://b/p"


def test_a_version_is_written_once_and_read_back_bucket_by_bucket_bit_for_bit(tmp_path: Path) -> None:
    state = tiny_state()
    store = open_weights_store((tmp_path / "checkpoints").as_uri())
    layer_bytes = sum(t.numel() * 4 for n, t in state.items() if n.startswith("model.layers.0."))
    written = publish_version(store, 7, state.items(), bucket_bytes=layer_bytes)
    assert written == sum(t.numel() * 4 for t in state.values())
    assert (tmp_path / "checkpoints-weights" / "step-00000007" / "MANIFEST.json").is_file()
    buckets = list(fetch_version(store, 7))
    # embed, then one bucket per layer (each exactly one layer's size), then the final norm
    assert len(buckets) == 5
    assert [sorted({n.split(".")[2] for n in b}) for b in buckets[1:4]] == [["0"], ["1"], ["2"]]
    merged = {name: tensor for bucket in buckets for name, tensor in bucket.items()}
    assert sorted(merged) == sorted(state)  # safetensors orders names within a file
    assert all(torch.equal(merged[n], state[n]) for n in state)


def test_the_store_keeps_the_two_newest_versions(tmp_path: Path) -> None:
    store = open_weights_store((tmp_path / "checkpoints").as_uri())
    for version in (1, 2, 3):
        publish_version(store, version, tiny_state(layers=1).items())
    assert [ref.step for ref in CheckpointStore.from_uri(store.location).list()] == [2, 3]


def test_a_store_worker_loads_the_version_into_its_engine_one_bucket_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flowlane.runtime.rollout.worker import RolloutWorker

    flowrun = load_flowrun(HEADER + f"spec: {{engine: {{weightSync: store}}, "
                                    f"storage: {{checkpointUri: '{(tmp_path / 'ck').as_uri()}'}}}}")
    state = tiny_state()
    publish_version(open_weights_store(flowrun.spec.storage.checkpoint_uri), 4, state.items(), bucket_bytes=1)

    class Engine:
        def __init__(self) -> None:
            self.calls: list[tuple[list[str], int]] = []

        async def load_weights(self, weights: Any, policy_version: int) -> None:
            self.calls.append(([name for name, _ in weights], policy_version))

    engine = Engine()
    worker = RolloutWorker(flowrun, "127.0.0.1:1", [], "rollout-0", None)
    asyncio.run(worker._sync_weights(None, engine, 4))  # weightSync store: no learner stream
    assert worker.stats.weight_bytes == sum(t.numel() * 4 for t in state.values())
    assert worker.stats.adapter_syncs == 0
    assert [len(names) for names, _ in engine.calls] == [1, 3, 3, 3, 1]  # embed, one layer per call, norm
    assert {version for _, version in engine.calls} == {4}


def _chunks(state: dict[str, torch.Tensor], chunk_bytes: int) -> list[Any]:
    from flowlane.kit.grpc_common import iter_weight_chunks

    return list(iter_weight_chunks(state, 5, chunk_bytes))


@pytest.mark.parametrize("chunk_bytes", [7, 1000, 1 << 20])
def test_the_grpc_stream_is_rebuilt_a_bucket_of_whole_layers_at_a_time(chunk_bytes: int) -> None:
    from flowlane.kit.weights import BucketAssembler

    state = tiny_state()
    layer_bytes = sum(t.numel() * 4 for n, t in state.items() if n.startswith("model.layers.0."))
    assembler = BucketAssembler(bucket_bytes=layer_bytes)
    names: list[list[str]] = []
    for chunk in _chunks(state, chunk_bytes):
        for bucket in assembler.feed(chunk):  # valid until the next feed, as the engine loads it
            names.append(list(bucket))
            assert all(torch.equal(bucket[n], state[n]) for n in bucket)
    assembler.finish()
    assert assembler.version == 5
    assert names == layer_buckets({n: t.numel() * 4 for n, t in state.items()}, layer_bytes)
    assert len(names) == 5


def test_a_bucket_is_handed_out_as_soon_as_its_last_byte_arrives() -> None:
    from flowlane.kit.weights import BucketAssembler

    state = tiny_state(layers=2)
    assembler = BucketAssembler(bucket_bytes=1)  # one group per bucket
    seen: list[int] = []
    for chunk in _chunks(state, 256):
        seen.append(len(list(assembler.feed(chunk))))
    # after the header, the embedding (32 x 16 float32: 2 KiB) takes 8 chunks: handed out with the last
    assert seen[:9] == [0] * 8 + [1]
    assert sum(seen) == 4


def test_a_stream_that_ends_early_is_refused() -> None:
    from flowlane.kit.grpc_common import WeightStreamError
    from flowlane.kit.weights import BucketAssembler

    assembler = BucketAssembler()
    for chunk in _chunks(tiny_state(), 1000)[:-1]:
        list(assembler.feed(chunk))
    with pytest.raises(WeightStreamError, match="ended early"):
        assembler.finish()


def test_a_grpc_worker_loads_each_bucket_into_its_engine_as_it_arrives() -> None:
    from flowlane.kit.weights import WEIGHT_BUCKET_BYTES
    from flowlane.runtime.rollout.worker import RolloutWorker

    flowrun = load_flowrun(HEADER)
    state = {f"model.layers.{i}.mlp.up_proj.weight": torch.full((1024, 1024 + i), float(i)) for i in range(20)}
    chunks = _chunks(state, 1 << 20)

    class Stub:
        def GetWeights(self, request: Any) -> Any:
            async def stream() -> Any:
                for chunk in chunks:
                    yield chunk
            return stream()

    class Engine:
        policy_version = 0

        def __init__(self) -> None:
            self.loaded: list[str] = []
            self.calls = 0

        async def load_weights(self, weights: Any, policy_version: int) -> None:
            for name, tensor in weights:
                assert torch.equal(tensor, state[name])
                self.loaded.append(name)
            self.calls += 1
            self.policy_version = policy_version

    engine = Engine()
    worker = RolloutWorker(flowrun, "127.0.0.1:1", [], "rollout-0", None)
    asyncio.run(worker._sync_weights(Stub(), engine, 5))
    assert sorted(engine.loaded) == sorted(state)
    # each layer is a little over 4 MiB: 7 fit in a 32 MiB bucket, 8 do not; 20 layers -> 7 + 7 + 6
    assert WEIGHT_BUCKET_BYTES == 32 * 2**20
    assert engine.calls == 3
    assert (engine.policy_version, worker.stats.weight_syncs) == (5, 1)
