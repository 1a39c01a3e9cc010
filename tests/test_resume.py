"""Exact resume: 4 steps straight == 2 steps, checkpoint, fresh learner, resume, 2 steps (bitwise).

The checkpoint travels through the real checkpoint store, on ``file://`` and on ``s3://`` against
moto's S3 server on loopback, so the whole path a resumed FlowRun takes is covered: learner files
-> store (manifest last) -> latest -> verified download -> a new Learner -> load.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from learner_helpers import make_tiny_model_dir, synthetic_trajectories

from flowlane.kit.checkpoints import CheckpointStore, model_identity
from flowlane.trainer.learner import Learner
from flowlane.trainer.learner_config import LearnerConfig, LoraSettings, LRSchedule

STEPS = 4
RESUME_AT = 2


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine two spinning OpenMP threads wait on each
    other (measured: a tiny-model step 30x slower, a 135M step 6x slower under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("resume-model"), seed=3)


@pytest.fixture
def deterministic() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def _config(model: Path, lora: bool) -> LearnerConfig:
    # Everything that carries state across steps is switched on: Adam moments, a warmup + cosine
    # schedule, the KL reference, importance weights, and dropout (RNG) in the LoRA case.
    return LearnerConfig(
        model_path=str(model),
        lr=1e-2,
        dtype="float32",
        kl_beta=0.05,
        warmup_steps=1,
        lr_schedule=LRSchedule.COSINE,
        total_steps=6,
        micro_batch_tokens=48,
        lora=LoraSettings(r=4, alpha=8, dropout=0.1) if lora else None,
        seed=11,
    )


def _batches() -> list[list[Any]]:
    return [synthetic_trajectories(100 + step, questions=3, group_size=3, policy_version=step) for step in range(STEPS)]


def _open_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> CheckpointStore:
    if kind == "file":
        return CheckpointStore.from_uri((tmp_path / "store").as_uri())
    s3 = request.getfixturevalue("s3_server")
    bucket = s3.make_bucket("resume")
    return CheckpointStore.from_uri(
        f"s3://{bucket}/run", endpoint=s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key
    )


def _final_weights(learner: Learner) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in learner.export_weights()}


@pytest.mark.parametrize(
    ("store_kind", "lora"), [("file", False), ("s3", False), ("file", True)], ids=["file-full", "s3-full", "file-lora"]
)
def test_resumed_run_matches_the_straight_run_bitwise(
    store_kind: str, lora: bool, tiny_model: Path, tmp_path: Path, request: pytest.FixtureRequest, deterministic: None
) -> None:
    batches = _batches()

    straight = Learner(_config(tiny_model, lora))
    straight_metrics = [straight.step(batch) for batch in batches]
    expected = _final_weights(straight)
    straight.close()

    first = Learner(_config(tiny_model, lora))
    for batch in batches[:RESUME_AT]:
        first.step(batch)
    meta = first.save_checkpoint_files(tmp_path / "out")
    first.close()
    store = _open_store(store_kind, tmp_path, request)
    store.save(RESUME_AT, tmp_path / "out", {**meta, "model": model_identity(tiny_model)})

    resumed = Learner(_config(tiny_model, lora))
    ref = store.latest()
    assert ref is not None and ref.step == RESUME_AT
    restored = resumed.load_checkpoint_files(
        store.download(ref, tmp_path / "in", expected_meta={"model": model_identity(tiny_model)})
    )
    assert (restored["step"], resumed.policy_version) == (RESUME_AT, RESUME_AT)
    resumed_metrics = [resumed.step(batch) for batch in batches[RESUME_AT:]]
    actual = _final_weights(resumed)
    resumed.close()

    assert resumed.policy_version == STEPS
    assert actual.keys() == expected.keys()
    differing = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not differing, f"weights differ after resume: {differing}"
    for straight_step, resumed_step in zip(straight_metrics[RESUME_AT:], resumed_metrics, strict=True):
        assert resumed_step["loss"] == straight_step["loss"]
        assert resumed_step["lr"] == straight_step["lr"]


def test_resume_without_the_checkpoint_diverges(tiny_model: Path, deterministic: None) -> None:
    """The control for the test above: skipping the restore gives different weights."""
    batches = _batches()
    straight = Learner(_config(tiny_model, lora=False))
    for batch in batches:
        straight.step(batch)
    expected = _final_weights(straight)
    straight.close()
    fresh = Learner(_config(tiny_model, lora=False))
    for batch in batches[RESUME_AT:]:
        fresh.step(batch)
    actual = _final_weights(fresh)
    fresh.close()
    assert any(not torch.equal(expected[name], actual[name]) for name in expected)
