"""The checkpoint store: complete-or-invisible checkpoints on file:// and on a real S3 endpoint.

S3 tests run against moto's server (with signature checking) on loopback through the minio SDK;
"the endpoint dies" is a :class:`TcpLink` in front of it being cut, so the server's state survives.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from flowlane.api.errors import ConfigError
from flowlane.kit.checkpoints import (
    MANIFEST_NAME,
    BestMode,
    CheckpointError,
    CheckpointStore,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    RetryPolicy,
    StoreConfigError,
    StoreUnavailableError,
    model_identity,
    pick_best,
    select_retained,
)

FAST_RETRY = RetryPolicy(attempts=3, initial_backoff_s=0.05, max_backoff_s=0.2, connect_timeout_s=2, read_timeout_s=10)
MODEL_A = {"model": {"architectures": ["LlamaForCausalLM"], "config_sha256": "a" * 64}}
MODEL_B = {"model": {"architectures": ["LlamaForCausalLM"], "config_sha256": "b" * 64}}


def make_source(root: Path, files: dict[str, int], seed: int = 0) -> Path:
    """A checkpoint-like directory: ``files`` maps relative paths to sizes of random bytes."""
    root.mkdir(parents=True)
    for index, (rel, size) in enumerate(files.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(hashlib.shake_256(f"{seed}/{index}".encode()).digest(size) if size else b"")
    return root


def small_source(tmp_path: Path, seed: int) -> Path:
    files = {"model/model.safetensors": 3000 + seed, "model/config.json": 40, "trainer_state.json": 64}
    return make_source(tmp_path / f"src-{seed}", files, seed)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass
class Backend:
    """One storage root under test, plus raw access that bypasses the store (to corrupt things)."""

    kind: str
    uri: str
    options: dict[str, Any]
    snapshot: Callable[[], dict[str, str]]  # every object under the root -> content digest
    put_raw: Callable[[str, bytes], None]
    delete_raw: Callable[[str], None]
    extra: dict[str, Any] = field(default_factory=dict)

    def open(self, **kwargs: Any) -> CheckpointStore:
        return CheckpointStore.from_uri(self.uri, **{"retry": FAST_RETRY, **self.options, **kwargs})

    def step_keys(self, step: int) -> list[str]:
        return sorted(k for k in self.snapshot() if k.startswith(f"step-{step:08d}/"))


def file_backend(tmp_path: Path) -> Backend:
    root = tmp_path / "ckpt"

    def snapshot() -> dict[str, str]:
        if not root.exists():
            return {}
        return {
            p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        }

    def put_raw(key: str, data: bytes) -> None:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)

    return Backend("file", root.as_uri(), {}, snapshot, put_raw, lambda key: (root / key).unlink())


def s3_backend(s3_server: Any, endpoint: str | None = None) -> Backend:
    bucket = s3_server.make_bucket("ckpt")
    client = s3_server.client()
    prefix = "runs/demo"

    def snapshot() -> dict[str, str]:
        objects = client.list_objects(bucket, prefix=f"{prefix}/", recursive=True)
        return {o.object_name[len(prefix) + 1 :]: o.etag for o in objects}

    def put_raw(key: str, data: bytes) -> None:
        client.put_object(bucket, f"{prefix}/{key}", io.BytesIO(data), len(data))

    options = {
        "endpoint": endpoint or s3_server.endpoint,
        "access_key": s3_server.access_key,
        "secret_key": s3_server.secret_key,
    }
    return Backend(
        "s3",
        f"s3://{bucket}/{prefix}",
        options,
        snapshot,
        put_raw,
        lambda key: client.remove_object(bucket, f"{prefix}/{key}"),
        {"bucket": bucket, "client": client},
    )


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "file":
        return file_backend(tmp_path)
    return s3_backend(request.getfixturevalue("s3_server"))


# ---------------------------------------------------------------------------- save, read, retention


def test_save_then_latest_returns_the_checkpoint_with_manifest_details(backend: Backend, tmp_path: Path) -> None:
    store = backend.open()
    src = small_source(tmp_path, seed=1)

    saved = store.save(7, src, {**MODEL_A, "policy_version": 7}, metric=0.25)
    latest = store.latest()

    assert latest == saved
    assert latest is not None
    assert latest.uri == f"{backend.uri}/step-00000007"
    assert latest.meta == {**MODEL_A, "policy_version": 7}
    assert latest.metric == 0.25
    assert [(f.path, f.size) for f in latest.files] == [
        ("model/config.json", 40),
        ("model/model.safetensors", 3001),
        ("trainer_state.json", 64),
    ]
    assert latest.files[1].sha256 == hashlib.sha256((src / "model/model.safetensors").read_bytes()).hexdigest()


def test_download_reproduces_every_file_byte_for_byte(backend: Backend, tmp_path: Path) -> None:
    store = backend.open()
    src = small_source(tmp_path, seed=2)
    ref = store.save(3, src, MODEL_A)

    out = store.download(ref, tmp_path / "restored")

    assert out == tmp_path / "restored"
    assert tree_bytes(out) == tree_bytes(src)


def test_retention_keeps_the_last_k_and_the_best(backend: Backend, tmp_path: Path) -> None:
    store = backend.open(keep_last=2)
    for step, metric in [(1, 0.1), (2, 0.9), (3, 0.2), (4, 0.3), (5, 0.4)]:
        store.save(step, small_source(tmp_path, seed=step), MODEL_A, metric=metric)

    assert [ref.step for ref in store.list()] == [2, 4, 5]
    best = store.best()
    assert best is not None and best.step == 2
    assert backend.step_keys(1) == backend.step_keys(3) == []


def test_best_by_lowest_metric_when_mode_is_min(backend: Backend, tmp_path: Path) -> None:
    store = backend.open(keep_last=1, best_mode=BestMode.MIN)
    for step, loss in [(1, 2.0), (2, 0.5), (3, 1.0)]:
        store.save(step, small_source(tmp_path, seed=step), MODEL_A, metric=loss)

    assert [ref.step for ref in store.list()] == [2, 3]
    best = store.best()
    assert best is not None and best.step == 2


def test_resaving_a_step_replaces_its_files(backend: Backend, tmp_path: Path) -> None:
    store = backend.open()
    store.save(4, make_source(tmp_path / "a", {"old.bin": 10, "same.bin": 5}), MODEL_A)

    ref = store.save(4, make_source(tmp_path / "b", {"same.bin": 6}, seed=9), MODEL_A)

    assert [f.path for f in ref.files] == ["same.bin"]
    assert backend.step_keys(4) == [f"step-00000004/{MANIFEST_NAME}", "step-00000004/same.bin"]
    assert tree_bytes(store.download(ref, tmp_path / "out")) == tree_bytes(tmp_path / "b")


def test_empty_store_has_no_latest_and_no_best(backend: Backend) -> None:
    store = backend.open()

    assert store.latest() is None
    assert store.best() is None
    assert store.list() == []


# ------------------------------------------------------------------------------------------ atomicity


def test_step_without_manifest_is_never_latest(backend: Backend, tmp_path: Path) -> None:
    store = backend.open()
    store.save(1, small_source(tmp_path, seed=1), MODEL_A)
    # What a save killed before its manifest leaves behind: files, no manifest.
    backend.put_raw("step-00000002/model/model.safetensors", b"half")

    latest = store.latest()

    assert latest is not None and latest.step == 1
    assert [ref.step for ref in store.list()] == [1]


def test_pointer_to_a_step_without_manifest_falls_back_to_newest_complete(backend: Backend, tmp_path: Path) -> None:
    store = backend.open()
    for step in (1, 2, 3):
        store.save(step, small_source(tmp_path, seed=step), MODEL_A)
    backend.delete_raw(f"step-00000003/{MANIFEST_NAME}")  # the pointer still names step 3

    latest = store.latest()

    assert latest is not None and latest.step == 2


def test_file_store_never_shows_a_step_directory_before_its_manifest(tmp_path: Path) -> None:
    backend = file_backend(tmp_path)
    store = backend.open()
    src = make_source(tmp_path / "src", {f"shard-{i}.bin": 200_000 for i in range(20)})
    seen_without_manifest: list[str] = []
    done = threading.Event()

    def watch() -> None:
        step_dir = tmp_path / "ckpt" / "step-00000001"
        while not done.is_set():
            if step_dir.exists() and not (step_dir / MANIFEST_NAME).exists():
                seen_without_manifest.append("step-00000001")
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        store.save(1, src, MODEL_A)
    finally:
        done.set()
        watcher.join()

    assert seen_without_manifest == []
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step-00000001"]


def test_next_save_removes_leftovers_of_a_failed_save(backend: Backend, tmp_path: Path) -> None:
    store = backend.open()
    store.save(1, small_source(tmp_path, seed=1), MODEL_A)
    backend.put_raw("step-00000002/model/model.safetensors", b"half")

    store.save(3, small_source(tmp_path, seed=3), MODEL_A)

    assert backend.step_keys(2) == []
    assert [ref.step for ref in store.list()] == [1, 3]


# ------------------------------------------------------------------------------- endpoint failures


def big_source(tmp_path: Path) -> Path:
    """Four 3 MiB files: enough bytes that a cut after 7 MiB lands inside the third upload."""
    return make_source(tmp_path / "big", {f"shard-{i}.bin": 3 << 20 for i in range(4)}, seed=42)


def test_endpoint_killed_mid_upload_keeps_previous_latest_and_next_save_succeeds(
    s3_server: Any, tcp_link: Callable[[int], Any], tmp_path: Path
) -> None:
    link = tcp_link(s3_server.port)
    backend = s3_backend(s3_server, endpoint=link.endpoint)
    store = backend.open()
    store.save(1, small_source(tmp_path, seed=1), MODEL_A)
    src = big_source(tmp_path)

    link.cut_after(7 << 20)  # the endpoint dies in the middle of step 2's upload
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=r"failed while uploading .*3 attempts"):
        store.save(2, src, MODEL_A)
    failed_after_s = time.monotonic() - started

    link.restore()
    partial = backend.step_keys(2)
    latest = store.latest()
    ref = store.save(2, src, MODEL_A)

    assert failed_after_s < 10
    assert partial and f"step-00000002/{MANIFEST_NAME}" not in partial  # it really died mid-upload
    assert latest is not None and latest.step == 1
    assert store.latest() == ref
    assert tree_bytes(store.download(ref, tmp_path / "out")) == tree_bytes(src)


def test_save_failure_is_a_checkpoint_error_a_training_loop_can_survive(
    s3_server: Any, tcp_link: Callable[[int], Any], tmp_path: Path
) -> None:
    link = tcp_link(s3_server.port)
    store = s3_backend(s3_server, endpoint=link.endpoint).open()
    reported: list[str] = []
    saved: list[int] = []
    for step in (1, 2, 3):  # a training loop: checkpoint each step, endpoint down during step 2
        if step == 2:
            link.cut()
        elif step == 3:
            link.restore()
        try:
            saved.append(store.save(step, small_source(tmp_path, seed=step), MODEL_A).step)
        except CheckpointError as exc:
            reported.append(str(exc))

    assert saved == [1, 3]
    assert len(reported) == 1 and "S3 endpoint" in reported[0] and "check that the endpoint is up" in reported[0]


def test_transient_outage_is_retried_and_save_succeeds(
    s3_server: Any, tcp_link: Callable[[int], Any], tmp_path: Path
) -> None:
    link = tcp_link(s3_server.port)
    store = s3_backend(s3_server, endpoint=link.endpoint).open(
        retry=RetryPolicy(attempts=8, initial_backoff_s=0.1, max_backoff_s=0.5, connect_timeout_s=2)
    )
    src = big_source(tmp_path)

    cuts: list[float] = []

    def restore_soon() -> None:
        cuts.append(time.monotonic())
        threading.Timer(0.4, link.restore).start()

    link.cut_after(4 << 20, on_cut=restore_soon)
    ref = store.save(1, src, MODEL_A)

    assert len(cuts) == 1  # the endpoint really went away mid-save
    assert store.latest() == ref
    assert tree_bytes(store.download(ref, tmp_path / "out")) == tree_bytes(src)


# ---------------------------------------------------------------------------------------- bad input


def test_corrupt_manifest_is_a_clear_error_and_nothing_is_touched(backend: Backend, tmp_path: Path) -> None:
    store = backend.open()
    store.save(1, small_source(tmp_path, seed=1), MODEL_A)
    store.save(2, small_source(tmp_path, seed=2), MODEL_A)
    backend.put_raw(f"step-00000002/{MANIFEST_NAME}", b'{"format": "flowlane-checkpoint/1", "step": 2, ')
    before = backend.snapshot()

    with pytest.raises(CorruptCheckpointError, match=r"step-00000002: MANIFEST.json is not valid JSON"):
        store.get(2)
    latest = store.latest()
    listed = [ref.step for ref in store.list()]

    assert latest is not None and latest.step == 1
    assert listed == [1]
    assert backend.snapshot() == before


def test_retention_leaves_a_step_with_a_corrupt_manifest_alone(backend: Backend, tmp_path: Path) -> None:
    store = backend.open(keep_last=1)
    store.save(1, small_source(tmp_path, seed=1), MODEL_A)
    backend.put_raw(f"step-00000001/{MANIFEST_NAME}", b"garbage")
    corrupt = {k: v for k, v in backend.snapshot().items() if k.startswith("step-00000001/")}

    store.save(2, small_source(tmp_path, seed=2), MODEL_A)

    assert {k: v for k, v in backend.snapshot().items() if k.startswith("step-00000001/")} == corrupt


def test_tampered_file_fails_download_and_leaves_no_destination(backend: Backend, tmp_path: Path) -> None:
    store = backend.open()
    ref = store.save(1, small_source(tmp_path, seed=1), MODEL_A)
    backend.put_raw("step-00000001/trainer_state.json", b"x" * 64)  # same size, other bytes

    with pytest.raises(CorruptCheckpointError, match=r"trainer_state.json has 64 bytes / sha256 "):
        store.download(ref, tmp_path / "out")

    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_checkpoint_of_another_model_is_refused_and_nothing_is_touched(backend: Backend, tmp_path: Path) -> None:
    store = backend.open()
    ref = store.save(1, small_source(tmp_path, seed=1), MODEL_A)
    before = backend.snapshot()

    with pytest.raises(IncompatibleCheckpointError, match=r"belongs to another model \(model: checkpoint has"):
        store.download(ref, tmp_path / "out", expected_meta=MODEL_B)
    with pytest.raises(IncompatibleCheckpointError):
        store.verify_compatible(ref, MODEL_B)
    store.verify_compatible(ref, MODEL_A)

    assert not (tmp_path / "out").exists()
    assert backend.snapshot() == before


def test_missing_bucket_is_a_clear_error_and_creates_nothing(s3_server: Any) -> None:
    with pytest.raises(StoreConfigError) as caught:
        CheckpointStore.from_uri(
            "s3://no-such-bucket/run",
            endpoint=s3_server.endpoint,
            access_key=s3_server.access_key,
            secret_key=s3_server.secret_key,
            retry=FAST_RETRY,
        )

    assert str(caught.value) == (
        f"bucket 'no-such-bucket' does not exist at {s3_server.endpoint}; create it or fix spec.storage.checkpointUri"
    )
    assert not s3_server.client().bucket_exists("no-such-bucket")


def test_wrong_credentials_are_a_clear_error_and_nothing_is_touched(s3_server: Any, tmp_path: Path) -> None:
    backend = s3_backend(s3_server)
    backend.open().save(1, small_source(tmp_path, seed=1), MODEL_A)
    before = backend.snapshot()
    wrong = {**backend.options, "secret_key": "not-the-secret"}

    with pytest.raises(StoreConfigError, match=r"rejected the credentials for bucket .* check AWS_ACCESS_KEY_ID"):
        CheckpointStore.from_uri(backend.uri, **wrong, retry=FAST_RETRY)
    unchecked = CheckpointStore.from_uri(backend.uri, **wrong, retry=FAST_RETRY, validate=False)
    started = time.monotonic()
    with pytest.raises(StoreConfigError, match="rejected the credentials"):
        unchecked.save(2, small_source(tmp_path, seed=2), MODEL_A)

    assert time.monotonic() - started < 2  # a permanent error is not retried
    assert backend.snapshot() == before


def test_s3_uri_without_endpoint_names_the_variable_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWLANE_S3_ENDPOINT", raising=False)

    with pytest.raises(StoreConfigError, match="set FLOWLANE_S3_ENDPOINT=host:port"):
        CheckpointStore.from_uri("s3://bucket/run")


def test_s3_endpoint_and_keys_come_from_the_environment(
    s3_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    backend = s3_backend(s3_server)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)

    ref = CheckpointStore.from_uri(backend.uri, retry=FAST_RETRY).save(1, small_source(tmp_path, seed=1), MODEL_A)

    assert ref.uri == f"{backend.uri}/step-00000001"


def test_invalid_bucket_name_is_a_config_error() -> None:
    with pytest.raises(StoreConfigError, match=r"bucket name 'Not_A_Bucket' is not valid"):
        CheckpointStore.from_uri("s3://Not_A_Bucket/run", endpoint="127.0.0.1:9", retry=FAST_RETRY)


def test_unsupported_scheme_is_a_config_error() -> None:
    with pytest.raises(StoreConfigError, match="unsupported scheme 'gs'; use s3:// or file://"):
        CheckpointStore.from_uri("gs://bucket/run")


def test_source_with_the_reserved_manifest_name_is_refused(backend: Backend, tmp_path: Path) -> None:
    store = backend.open()
    src = make_source(tmp_path / "src", {MANIFEST_NAME: 10})

    with pytest.raises(ConfigError, match="a name the store reserves"):
        store.save(1, src, MODEL_A)

    assert backend.snapshot() == {}


# ------------------------------------------------------------------------------------- pure pieces


def test_retention_selection_keeps_newest_best_and_pinned_steps() -> None:
    metrics = {1: 0.5, 2: None, 3: 0.9, 4: 0.1, 5: float("nan"), 6: 0.2}

    assert select_retained(metrics, 2, BestMode.MAX) == {3, 5, 6}
    assert select_retained(metrics, 2, BestMode.MIN) == {4, 5, 6}
    assert select_retained(metrics, 1, BestMode.MAX, must_keep={2}) == {2, 3, 6}


def test_best_metric_ties_go_to_the_newer_step() -> None:
    assert pick_best({1: 0.5, 2: 0.5, 3: 0.1}, BestMode.MAX) == 2
    assert pick_best({1: 0.1, 2: 0.5, 3: 0.1}, BestMode.MIN) == 3
    assert pick_best({1: None}, BestMode.MAX) is None


def test_retry_backoff_doubles_and_caps() -> None:
    policy = RetryPolicy(initial_backoff_s=0.5, multiplier=2.0, max_backoff_s=3.0)

    assert [policy.backoff_s(k) for k in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_model_identity_ignores_versions_and_load_settings(tmp_path: Path) -> None:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    (tmp_path / "a" / "config.json").write_text(json.dumps({**config, "transformers_version": "4.56"}))
    (tmp_path / "b" / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    (tmp_path / "c" / "config.json").write_text(json.dumps({**config, "hidden_size": 960}))

    a, b, c = (model_identity(tmp_path / name) for name in "abc")

    assert a == b
    assert a["architectures"] == ["LlamaForCausalLM"] and a["model_type"] == "llama"
    assert a["config_sha256"] != c["config_sha256"]


def test_meta_must_be_json_serializable(tmp_path: Path) -> None:
    store = file_backend(tmp_path).open()

    with pytest.raises(ConfigError, match="JSON-serializable"):
        store.save(1, small_source(tmp_path, seed=1), {"rng": object()})
    assert not os.path.exists(tmp_path / "ckpt" / "step-00000001")
