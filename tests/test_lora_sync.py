"""LoRA weight sync: a LoRA run's rollout engine loads the adapter alone, not the model.

The learner (the bundled SmolLM2-135M with a rank-16 adapter on the attention projections, as
``model.lora`` defaults to) publishes its adapter in PEFT's format; the worker's real sync code
moves it over the gRPC weight stream or the weights store into one LoRA-enabled vLLM engine for
this module (its start is the expensive part), which then generates through it. Checked: the
bytes moved are the adapter's exactly (about 1.4% of the model's), the engine's greedy output
changes with a trained adapter and is the base model's token for token with a fresh one (lora_B
is zero), the frozen modules' view never sees the adapter, and the engine holds one adapter
however many versions it loaded.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch

from flowlane.api.errors import ConfigError, FlowlaneError
from flowlane.api.flowrun import load_flowrun
from flowlane.kit.grpc_common import iter_weight_chunks
from flowlane.kit.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, read_adapter, write_adapter
from flowlane.kit.weights import adapter_sync, open_weights_store
from flowlane.runtime.engines.base import Generation, SamplingSettings
from flowlane.runtime.engines.vllm_engine import VLLMEngine, lora_slot_rank
from flowlane.runtime.rollout.worker import RolloutWorker, engine_options, fetch_weights
from flowlane.trainer.learner import Learner
from flowlane.trainer.learner_config import LearnerConfig, LoraSettings

# The engine lives in the session event loop (as fixtures_models.py's); tests that use it run there.
session_loop = pytest.mark.asyncio(loop_scope="session")

LORA = LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
PROMPTS = [
    [{"role": "user", "content": "Name three colors of the rainbow."}],
    [{"role": "user", "content": "What is 12 + 30? Answer briefly."}],
]
GREEDY = SamplingSettings(max_tokens=24, temperature=0.0)
FLOWRUN = """apiVersion: flowlane.dev/v1alpha1
kind: FlowRun
metadata: {name: lora-demo}
spec:
  model: {lora: {enabled: true, rank: 16, alpha: 32}}
"""


# -- fixtures: one learner and one LoRA engine for the module -----------------------------------------


@pytest.fixture(scope="module")
def lora_learner(model_dir: Path) -> Iterator[Learner]:
    learner = Learner(LearnerConfig(model_path=str(model_dir), dtype="float32", lora=LORA, kl_beta=0.0))
    try:
        yield learner
    finally:
        learner.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def lora_engine(model_dir: Path) -> AsyncIterator[VLLMEngine]:
    engine = VLLMEngine(model_dir, max_model_len=2048, kv_cache_gib=1, max_num_seqs=8, max_lora_rank=LORA.r)
    try:
        yield engine
    finally:
        await engine.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def base_outputs(lora_engine: VLLMEngine) -> list[Generation]:
    """Greedy generations of the base model, before any adapter was loaded."""
    assert lora_engine.policy_version == 0
    return [await lora_engine.chat(prompt, GREEDY) for prompt in PROMPTS]


def set_lora_b(learner: Learner, std: float, seed: int = 0) -> None:
    """Every lora_B to N(0, std) (std 0: zero, as PEFT initialises it); lora_A keeps its random init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in learner.engine.module.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for _, t in tensors)


def model_bytes(learner: Learner) -> int:
    return sum(p.numel() * p.element_size() for n, p in learner.engine.module.named_parameters() if "lora_" not in n)


class Stub:
    """The learner's GetWeights as the service streams it: the production chunking of one version."""

    def __init__(self, version: int, adapter_config: str, tensors: list[tuple[str, torch.Tensor]]) -> None:
        self.chunks = list(iter_weight_chunks(tensors, version, 1 << 20, adapter_config))

    def GetWeights(self, request: Any) -> Any:
        async def stream() -> Any:
            for chunk in self.chunks:
                yield chunk
        return stream()


async def generate(engine: Any) -> list[Generation]:
    return [await engine.chat(prompt, GREEDY) for prompt in PROMPTS]


# -- no engine needed ---------------------------------------------------------------------------------


def test_vllm_lora_rank_rounds_up_to_a_slot_and_refuses_above_the_largest() -> None:
    assert [lora_slot_rank(r) for r in (1, 4, 8, 16, 17, 512)] == [1, 8, 8, 16, 32, 512]
    with pytest.raises(ConfigError, match=r"model.lora.rank: 600 is above the largest LoRA rank vLLM serves \(512\)"):
        lora_slot_rank(600)


def test_a_lora_run_on_vllm_syncs_adapters_and_starts_its_engine_with_lora() -> None:
    spec = load_flowrun(FLOWRUN).spec
    assert engine_options(spec)["max_lora_rank"] == 16
    assert adapter_sync(True, "vllm")
    assert not adapter_sync(True, "transformers")  # no LoRA serving there: the merged weights go
    assert not adapter_sync(False, "vllm")
    full = load_flowrun(FLOWRUN.replace("enabled: true", "enabled: false")).spec
    assert "max_lora_rank" not in engine_options(full)


def test_an_adapter_directory_refuses_full_weights_and_non_lora_configs(tmp_path: Path) -> None:
    config = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    with pytest.raises(FlowlaneError, match=r"'model\.norm\.weight' is not a LoRA weight"):
        write_adapter(tmp_path / "a", config, [("model.norm.weight", torch.ones(4))])
    with pytest.raises(FlowlaneError, match="is not a LoRA adapter config"):
        write_adapter(tmp_path / "b", json.dumps({"peft_type": "PREFIX_TUNING"}), [])
    lora = [("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", torch.arange(8.0).reshape(2, 4))]
    assert write_adapter(tmp_path / "c", config, lora) == 32
    text, tensors = read_adapter(tmp_path / "c")
    assert text == config and torch.equal(tensors[lora[0][0]], lora[0][1])


# -- the learner's side -------------------------------------------------------------------------------


def test_the_learner_exports_the_adapter_alone_in_peft_format(lora_learner: Learner, model_dir: Path,
                                                              tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    set_lora_b(lora_learner, std=0.05, seed=1)
    config_text, tensors = lora_learner.export_adapter()
    config = json.loads(config_text)
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 16, 32)
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    layers = lora_learner.base_identity["num_hidden_layers"]
    assert len(tensors) == layers * 4 * 2  # lora_A and lora_B of 4 projections per layer
    assert all(n.startswith("base_model.model.model.layers.") and (".lora_A." in n or ".lora_B." in n)
               for n, _ in tensors)
    trainable = sum(p.numel() * p.element_size() for p in trainable_params(lora_learner))
    assert nbytes(tensors) == trainable
    assert nbytes(tensors) < 0.02 * model_bytes(lora_learner)
    # What PEFT itself loads from those two files is the learner's policy.
    write_adapter(tmp_path, config_text, tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32),
                                     str(tmp_path)).eval()
    ids = torch.tensor([[1, 9690, 198, 2683, 314, 253, 5356, 30]])
    with torch.no_grad():
        theirs = peft(input_ids=ids).logits
        ours = lora_learner.engine.module.eval()(input_ids=ids).logits
    lora_learner.engine.module.train()
    assert torch.allclose(theirs, ours, atol=1e-5)
    # export_policy is what the learner service publishes: the adapter, or (other engines) full weights.
    assert lora_learner.export_policy(adapter_only=True)[0] == config_text
    assert lora_learner.export_policy(adapter_only=False)[0] == ""


def trainable_params(learner: Learner) -> list[torch.Tensor]:
    return [p for p in learner.engine.module.parameters() if p.requires_grad]


# -- the engine's side --------------------------------------------------------------------------------


@session_loop
async def test_a_fresh_adapter_gives_the_base_models_greedy_output_exactly(
        lora_engine: VLLMEngine, lora_learner: Learner, base_outputs: list[Generation]) -> None:
    set_lora_b(lora_learner, std=0.0)  # lora_B = 0: the adapter adds nothing
    config_text, tensors = lora_learner.export_adapter()
    worker = RolloutWorker(load_flowrun(FLOWRUN), "127.0.0.1:1", [], "rollout-0", None)
    await worker._sync_weights(Stub(1, config_text, tensors), lora_engine, 1)

    assert (worker.stats.adapter_syncs, worker.stats.weight_bytes) == (1, nbytes(tensors))
    after = await generate(lora_engine)
    assert [g.policy_version for g in after] == [1, 1]
    for base, zero in zip(base_outputs, after, strict=True):
        assert zero.token_ids == base.token_ids and zero.text == base.text
        assert zero.logprobs == pytest.approx(base.logprobs, abs=1e-5)


@session_loop
async def test_a_lora_sync_moves_adapter_bytes_and_changes_the_output_over_grpc_and_the_store(
        lora_engine: VLLMEngine, lora_learner: Learner, base_outputs: list[Generation], tmp_path: Path) -> None:
    """The learner service publishes version 2 (gRPC) and 3 (store); the worker's sync loads each."""
    from flowlane.api import learner_pb2_grpc
    from flowlane.kit.grpc_common import bind_port, create_server, open_channel
    from flowlane.trainer.learner_service import LearnerRuntime, make_servicer

    set_lora_b(lora_learner, std=0.2, seed=2)
    adapter_bytes = nbytes(lora_learner.export_adapter()[1])
    runtime = LearnerRuntime(load_flowrun(FLOWRUN), tmp_path)
    runtime.learner = lora_learner
    lora_learner.policy_version = 2
    await runtime._publish_weights()
    server = create_server("tok")
    learner_pb2_grpc.add_LearnerServicer_to_server(make_servicer(runtime), server)
    address = f"127.0.0.1:{bind_port(server, '127.0.0.1', 0)}"
    await server.start()
    worker = RolloutWorker(load_flowrun(FLOWRUN), address, [], "rollout-0", "tok")
    try:
        async with open_channel(address, "tok") as channel:
            await worker._sync_weights(learner_pb2_grpc.LearnerStub(channel), lora_engine, 2)
    finally:
        await server.stop(grace=None)

    assert (worker.stats.weight_bytes, worker.stats.adapter_syncs) == (adapter_bytes, 1)  # the adapter, no more
    assert adapter_bytes < 0.02 * model_bytes(lora_learner)
    trained = await generate(lora_engine)
    assert [g.policy_version for g in trained] == [2, 2]
    assert any(t.token_ids != b.token_ids for t, b in zip(trained, base_outputs, strict=True))
    # vLLM applies the adapter as PEFT does: the learner's policy scores the tokens vLLM chose alike.
    module = lora_learner.engine.module.eval()
    with torch.no_grad():
        for gen in trained:
            ids = torch.tensor([gen.prompt_ids + gen.token_ids])
            logits = module(input_ids=ids).logits[0, len(gen.prompt_ids) - 1:-1].float()
            ours = torch.log_softmax(logits, -1).gather(1, torch.tensor(gen.token_ids)[:, None]).squeeze(1)
            assert (ours - torch.tensor(gen.logprobs)).abs().max().item() < 1e-3
    module.train()
    # The frozen modules' view of the same engine is the base model still.
    frozen = await generate(lora_engine.base_model())
    assert [g.token_ids for g in frozen] == [b.token_ids for b in base_outputs]
    assert [g.policy_version for g in frozen] == [0, 0]

    # weightSync store: the learner writes the adapter as a PEFT directory; the same bytes, the same output.
    runtime.weights_store = store = open_weights_store((tmp_path / "checkpoints").as_uri())
    lora_learner.policy_version = 3
    await runtime._publish_weights()
    assert sorted(f.path for f in store.get(3).files) == [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]
    synced = await fetch_weights(store, lora_engine, 3)
    assert (synced.version, synced.nbytes, synced.adapter) == (3, adapter_bytes, True)
    again = await generate(lora_engine)
    assert [g.policy_version for g in again] == [3, 3]
    assert [g.token_ids for g in again] == [t.token_ids for t in trained]
    # Three versions loaded, one adapter held: each replaced the one before.
    assert len(await lora_engine.loaded_adapters()) == 1


def test_with_several_ranks_the_adapter_export_is_announced_so_zero3_followers_gather_with_rank_0() -> None:
    from flowlane.trainer.distributed import Call, LeadLearner, follow

    class Channel:
        def __init__(self, calls: list[tuple[Call, tuple[Any, ...]]] | None = None) -> None:
            self.sent: list[tuple[Call, tuple[Any, ...]]] = []
            self.queue = list(calls or [])

        def announce(self, call: Call, *args: Any) -> None:
            self.sent.append((call, args))

        def receive(self) -> tuple[Call, tuple[Any, ...]]:
            return self.queue.pop(0)

    class Rank:
        def __init__(self, zero_stage: int) -> None:
            self.config = LearnerConfig(model_path="m", zero_stage=zero_stage)
            self.exports: list[bool] = []

        def export_policy(self, adapter_only: bool) -> tuple[str, list[tuple[str, torch.Tensor]]]:
            self.exports.append(adapter_only)
            return "{}", []

        def close(self) -> None:
            pass

    channel, lead_rank = Channel(), Rank(3)
    assert LeadLearner(lead_rank, channel).export_policy(True) == ("{}", [])
    assert channel.sent == [(Call.EXPORT_POLICY, (True,))] and lead_rank.exports == [True]
    for stage, gathers in ((3, [True]), (2, [])):  # only ZeRO-3 shards the adapter: others read their own
        follower = Rank(stage)
        assert follow(follower, Channel([(Call.EXPORT_POLICY, (True,)), (Call.END, ())])) == 1
        assert follower.exports == gathers
