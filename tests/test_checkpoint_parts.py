"""A checkpoint written by several writers: parts uploaded by some, committed by one.

Learner pods that do not share a filesystem each upload their own ZeRO shards and RNG states
(``CheckpointStore.save_part``); rank 0's ``save(..., parts=...)`` then writes its own files and
one manifest naming everything, so the checkpoint appears whole or not at all, on ``file://``
and on S3 alike.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_checkpoint import MODEL_A, Backend, file_backend, make_source, s3_backend, tree_bytes

from flowlane.api.errors import ConfigError
from flowlane.kit.checkpoints import CheckpointError


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "file":
        return file_backend(tmp_path)
    return s3_backend(request.getfixturevalue("s3_server"))


def rank_zero_files(tmp_path: Path) -> Path:
    return make_source(tmp_path / "rank0", {"model.safetensors": 3000, "learner_state.json": 50,
                                            "deepspeed/flowlane/zero_pp_rank_0_optim_states.pt": 700}, seed=0)


def pod_files(tmp_path: Path, rank: int) -> Path:
    return make_source(tmp_path / f"pod{rank}", {f"deepspeed/flowlane/zero_pp_rank_{rank}_optim_states.pt": 700 + rank,
                                                 f"deepspeed/rng_state_rank{rank}.pt": 30}, seed=rank)


def test_parts_of_two_pods_and_rank_zeros_files_form_one_checkpoint(backend: Backend, tmp_path: Path) -> None:
    store = backend.open()
    parts = [*store.save_part(4, pod_files(tmp_path, 1)), *store.save_part(4, pod_files(tmp_path, 2))]

    ref = store.save(4, rank_zero_files(tmp_path), MODEL_A, parts=parts)

    expected = tree_bytes(tmp_path / "rank0") | tree_bytes(tmp_path / "pod1") | tree_bytes(tmp_path / "pod2")
    assert sorted(f.path for f in ref.files) == sorted(expected)
    assert store.latest() == ref
    assert tree_bytes(store.download(ref, tmp_path / "restored")) == expected


def test_uploaded_parts_alone_are_no_checkpoint(backend: Backend, tmp_path: Path) -> None:
    store = backend.open()
    store.save_part(4, pod_files(tmp_path, 1))

    assert store.latest() is None
    assert store.list() == []


def test_leftovers_of_a_failed_save_go_but_the_parts_stay(backend: Backend, tmp_path: Path) -> None:
    store = backend.open()
    backend.put_raw("step-00000004/deepspeed/stale.pt", b"from an earlier attempt")
    parts = store.save_part(4, pod_files(tmp_path, 1))

    store.save(4, rank_zero_files(tmp_path), MODEL_A, parts=parts)

    keys = backend.step_keys(4)
    assert "step-00000004/deepspeed/stale.pt" not in keys
    assert "step-00000004/deepspeed/rng_state_rank1.pt" in keys
    assert "step-00000004/deepspeed/flowlane/zero_pp_rank_1_optim_states.pt" in keys


def test_a_file_written_by_two_writers_is_refused(backend: Backend, tmp_path: Path) -> None:
    store = backend.open()
    clashing = make_source(tmp_path / "clash", {"learner_state.json": 10}, seed=9)
    parts = store.save_part(4, clashing)

    with pytest.raises(ConfigError, match=r"learner_state.json is both in .* and in another writer's part"):
        store.save(4, rank_zero_files(tmp_path), MODEL_A, parts=parts)
    assert store.latest() is None


def test_a_reported_part_that_never_arrived_fails_the_save_and_leaves_no_checkpoint(tmp_path: Path) -> None:
    backend = file_backend(tmp_path)
    store = backend.open()
    parts = store.save_part(4, pod_files(tmp_path, 1))
    (tmp_path / "ckpt" / ".step-00000004.parts" / "deepspeed" / "rng_state_rank1.pt").unlink()

    with pytest.raises(CheckpointError, match=r"the part deepspeed/rng_state_rank1.pt another writer reported is "
                                              r"missing"):
        store.save(4, rank_zero_files(tmp_path), MODEL_A, parts=parts)
    assert store.latest() is None
    assert not any(p.name.startswith(".step-00000004.partial") for p in (tmp_path / "ckpt").iterdir())
