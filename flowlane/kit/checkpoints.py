"""The checkpoint store: atomic, verifiable checkpoints on ``file://`` or any S3 endpoint.

A learner that resumes from a half-written checkpoint silently trains a different model, so the
store's one promise is that a checkpoint is either complete or invisible:

- Every file of a checkpoint directory goes under ``<root>/step-<08d>/`` first; the **manifest**
  (each file's size and sha256, the step, the caller's meta, the metric, the time) is written
  **last**. A step without a valid manifest does not exist as far as :meth:`latest`, :meth:`list`
  and :meth:`best` are concerned. On ``file://`` the whole step is written into a hidden temp
  directory and renamed into place, so even the partial files are never visible.
- After the manifest, a small ``latest`` pointer names the step. :meth:`latest` trusts the
  pointer only when the step it names has a valid manifest; otherwise it falls back to the
  newest complete step.
- :meth:`download` checks every byte against the manifest's sha256 and can refuse a checkpoint
  of another model (the caller puts the model identity in ``meta``; see :func:`model_identity`).
- Retention keeps the last ``keep_last`` complete checkpoints and the best one by metric.
  Deleting removes the manifest first, so a half-deleted checkpoint is invisible too.
- Network trouble is expected: each S3 operation is retried with exponential backoff
  (:class:`RetryPolicy`); when retries run out, :class:`StoreUnavailableError` (a
  :class:`CheckpointError`) is raised. The training loop catches ``CheckpointError``, reports it
  and keeps training; the previous complete checkpoint stays the latest.
- Bad input is reported, never "repaired": a missing bucket, rejected credentials, a corrupt
  manifest or a checkpoint of another model raise a :class:`CheckpointError` subclass whose
  message says what to fix, and no existing checkpoint is modified.

The store moves files and manifests only; it knows nothing about torch, so the learner decides
what a checkpoint directory holds (safetensors weights, optimizer and RNG state, task cursor...).
One writer per root is assumed (the learner); readers may be many.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO, TypeVar, cast
from urllib.parse import urlparse

from flowlane.api.errors import ConfigError, FlowlaneError
from flowlane.kit import s3

log = logging.getLogger(__name__)

MANIFEST_NAME = "MANIFEST.json"
# The file in a checkpoint root that names its latest step (a run's checkpoints/ directory has one).
CHECKPOINT_POINTER = "latest"
POINTER_NAME = CHECKPOINT_POINTER
MANIFEST_FORMAT = "flowlane-checkpoint/1"
ENDPOINT_ENV = s3.ENDPOINT_ENV
ACCESS_KEY_ENV = s3.ACCESS_KEY_ENV
SECRET_KEY_ENV = s3.SECRET_KEY_ENV
URI_FIELD = "spec.storage.checkpointUri"

_STEP_DIR = re.compile(r"^step-(\d{8})$")
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CHUNK_BYTES = 1 << 20
_S3_PART_BYTES = 64 << 20

T = TypeVar("T")


#: The parts of a learner checkpoint that only resuming training reads: DeepSpeed's optimizer and
#: lr-scheduler state (twice the weights' size with Adam) and the RNG states. Serving and
#: evaluating a checkpoint need the rest: weights, config and tokenizer.
DEEPSPEED_DIR = "deepspeed"
RNG_FILE = "rng_state.pt"


def is_training_state(path: str) -> bool:
    """True for a checkpoint file (manifest path) that only resuming training needs."""
    return path == RNG_FILE or path.startswith(f"{DEEPSPEED_DIR}/")


# ------------------------------------------------------------------------------------------ errors


class CheckpointError(FlowlaneError):
    """A checkpoint operation failed. Training loops catch this, report it and keep going."""


class StoreUnavailableError(CheckpointError):
    """The storage endpoint did not answer (or kept failing) through every retry."""


class StoreConfigError(CheckpointError, ConfigError):
    """The store itself is misconfigured: bad URI, missing bucket, rejected credentials."""


class CorruptCheckpointError(CheckpointError):
    """A manifest that does not parse, or files that do not match their manifest."""


class IncompatibleCheckpointError(CheckpointError):
    """A checkpoint written for a different model than the one being trained or served."""


# ------------------------------------------------------------------------------------- plain data


class BestMode(StrEnum):
    """Which metric value is the best checkpoint's: the highest (reward) or the lowest (loss)."""

    MAX = "max"
    MIN = "min"


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try before a storage operation is declared failed.

    Attempt ``k`` (from 1) waits ``min(initial_backoff_s * multiplier**(k-1), max_backoff_s)``
    before the next. The timeouts bound one attempt, so an endpoint that hangs instead of
    refusing costs at most ``attempts * (read_timeout_s + backoff)``.
    """

    attempts: int = 5
    initial_backoff_s: float = 0.5
    multiplier: float = 2.0
    max_backoff_s: float = 8.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"RetryPolicy.attempts: must be >= 1, got {self.attempts}")

    def backoff_s(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return float(min(self.initial_backoff_s * self.multiplier ** (attempt - 1), self.max_backoff_s))


@dataclass(frozen=True)
class ManifestFile:
    path: str  # POSIX path relative to the checkpoint directory
    size: int
    sha256: str


@dataclass(frozen=True)
class CheckpointRef:
    """A complete checkpoint, as its manifest describes it."""

    step: int
    uri: str  # e.g. s3://bucket/run/step-00000012 or file:///runs/x/step-00000012
    meta: Mapping[str, Any] = field(compare=False)
    metric: float | None
    created_at: str  # ISO-8601, UTC
    files: tuple[ManifestFile, ...] = field(compare=False)

    @property
    def name(self) -> str:
        return step_dir_name(self.step)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def build_manifest(
    step: int, files: Sequence[ManifestFile], meta: Mapping[str, Any], metric: float | None, now: float
) -> bytes:
    doc = {
        "format": MANIFEST_FORMAT,
        "step": step,
        "created_at": datetime.fromtimestamp(now, UTC).isoformat(),
        "metric": metric,
        "meta": dict(meta),
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files],
    }
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def parse_manifest(data: bytes, step: int, uri: str) -> CheckpointRef:
    """Validate a manifest strictly; anything odd is a :class:`CorruptCheckpointError`."""

    def corrupt(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"checkpoint {uri}: {MANIFEST_NAME} {why}; delete that step or resume from another one"
        )

    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise corrupt(f"is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise corrupt(f"is not a {MANIFEST_FORMAT} manifest")
    if doc.get("step") != step:
        raise corrupt(f"names step {doc.get('step')!r}, expected {step}")
    metric = doc.get("metric")
    if metric is not None and not isinstance(metric, int | float):
        raise corrupt(f"has a non-numeric metric {metric!r}")
    meta, raw_files = doc.get("meta"), doc.get("files")
    if not isinstance(meta, dict) or not isinstance(raw_files, list) or not raw_files:
        raise corrupt("lacks meta or its file list")
    files = []
    for entry in raw_files:
        try:
            path, size, digest = entry["path"], entry["size"], entry["sha256"]
        except (TypeError, KeyError):
            raise corrupt(f"has a malformed file entry {entry!r}") from None
        if not (isinstance(path, str) and _is_safe_relpath(path)):
            raise corrupt(f"has an unsafe file path {path!r}")
        if not (isinstance(size, int) and size >= 0 and isinstance(digest, str) and len(digest) == 64):
            raise corrupt(f"has a malformed size or sha256 for {path!r}")
        files.append(ManifestFile(path, size, digest))
    return CheckpointRef(
        step=step,
        uri=uri,
        meta=meta,
        metric=None if metric is None else float(metric),
        created_at=str(doc.get("created_at", "")),
        files=tuple(files),
    )


def _is_safe_relpath(path: str) -> bool:
    pure = PurePosixPath(path)
    return bool(path) and not pure.is_absolute() and ".." not in pure.parts and "\\" not in path


def pick_best(metrics: Mapping[int, float | None], mode: BestMode) -> int | None:
    """The step with the best finite metric (ties go to the newer step), or None."""
    scored = [(m, s) for s, m in metrics.items() if m is not None and math.isfinite(m)]
    if not scored:
        return None
    if mode is BestMode.MAX:
        return max(scored)[1]
    return min(scored, key=lambda ms: (ms[0], -ms[1]))[1]


def select_retained(
    metrics: Mapping[int, float | None], keep_last: int, mode: BestMode, must_keep: Iterable[int] = ()
) -> set[int]:
    """The steps retention keeps: the newest ``keep_last``, the best by metric, and ``must_keep``."""
    keep = set(sorted(metrics)[-keep_last:]) | set(must_keep)
    best = pick_best(metrics, mode)
    if best is not None:
        keep.add(best)
    return keep


def model_identity(model_dir: Path) -> dict[str, Any]:
    """What makes two checkpoints "the same model": put it in ``meta["model"]`` when saving.

    Reads ``config.json`` (a transformers model directory) and hashes it canonically, leaving out
    keys that change with library versions or load settings rather than with the weights' shape
    and meaning (``transformers_version``, ``torch_dtype``/``dtype``, ``_name_or_path``,
    ``use_cache``).
    """
    config_path = Path(model_dir) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{config_path}: cannot read the model config ({exc}); is it a model directory?") from None
    volatile = {"transformers_version", "torch_dtype", "dtype", "_name_or_path", "use_cache"}
    stable = {k: v for k, v in config.items() if k not in volatile}
    return {
        "architectures": list(config.get("architectures") or []),
        "model_type": config.get("model_type"),
        "config_sha256": hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest(),
    }


def check_compatible(ref: CheckpointRef, expected_meta: Mapping[str, Any]) -> None:
    """Raise :class:`IncompatibleCheckpointError` unless every expected key matches the ref's meta."""
    differing = [key for key, want in expected_meta.items() if ref.meta.get(key) != want]
    if differing:
        shown = "; ".join(f"{k}: checkpoint has {ref.meta.get(k)!r}, expected {expected_meta[k]!r}" for k in differing)
        raise IncompatibleCheckpointError(
            f"checkpoint {ref.uri} belongs to another model ({shown}); point {URI_FIELD} at this "
            "model's checkpoints or start without resuming"
        )


# ----------------------------------------------------------------------------------------- backends


class _HashingReader:
    """A read-only file wrapper that hashes what passes through, so uploads read each byte once."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data


def _copy_and_hash(src: Path, dest: Path, *, durable: bool) -> tuple[int, str]:
    """Copy with the kernel's fast path, then hash what landed (page cache hot): ~4x a Python loop."""
    shutil.copyfile(src, dest)
    with dest.open("rb") as fin:
        digest = hashlib.file_digest(fin, "sha256").hexdigest()
        if durable:
            os.fsync(fin.fileno())
        return os.fstat(fin.fileno()).st_size, digest


class _Backend(ABC):
    """Where the bytes go. Keys are relative to the store root, POSIX style."""

    location: str  # the store root as a URI, for messages and refs

    @abstractmethod
    def check(self) -> None:
        """Fail fast with a StoreConfigError when the store cannot work at all."""

    @abstractmethod
    def list_step_dirs(self) -> dict[int, bool]:
        """Every ``step-*`` directory present, mapped to whether it has a manifest."""

    @abstractmethod
    def read(self, key: str) -> bytes | None:
        """A small object's bytes, or None if it does not exist."""

    @abstractmethod
    def write_pointer(self, data: bytes) -> None: ...

    @abstractmethod
    def write_step(
        self, name: str, sources: Sequence[tuple[str, Path]], manifest_for: Callable[[list[ManifestFile]], bytes]
    ) -> None:
        """Write the files, then ``manifest_for(written files)`` as the manifest, last."""

    @abstractmethod
    def fetch(self, key: str, dest: Path) -> tuple[int, str]:
        """Stream an object into ``dest``; return (size, sha256). Missing -> CorruptCheckpointError."""

    @abstractmethod
    def delete_step(self, name: str) -> None:
        """Remove a step directory, manifest first."""


class _LocalBackend(_Backend):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = root.as_uri()

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreConfigError(
                f"checkpoint directory {self.root} cannot be created ({exc.strerror}); fix {URI_FIELD}"
            ) from None
        if not os.access(self.root, os.W_OK):
            raise StoreConfigError(f"checkpoint directory {self.root} is not writable; fix {URI_FIELD}")

    def list_step_dirs(self) -> dict[int, bool]:
        found: dict[int, bool] = {}
        if not self.root.is_dir():
            return found
        for entry in self.root.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and entry.is_dir():
                found[int(match.group(1))] = (entry / MANIFEST_NAME).is_file()
        return found

    def read(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CheckpointError(f"cannot read {self.root / key}: {exc.strerror}") from None

    def write_pointer(self, data: bytes) -> None:
        self._write_atomic(self.root / POINTER_NAME, data)

    def write_step(
        self, name: str, sources: Sequence[tuple[str, Path]], manifest_for: Callable[[list[ManifestFile]], bytes]
    ) -> None:
        final = self.root / name
        staging = self.root / f".{name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            staging.mkdir(parents=True)
            written = []
            for rel, src in sources:
                dest = staging / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                size, digest = _copy_and_hash(src, dest, durable=True)
                written.append(ManifestFile(rel, size, digest))
            self._write_atomic(staging / MANIFEST_NAME, manifest_for(written))
            if final.exists():  # re-saving a step: retire the old one without a visible gap in files
                retired = self.root / f".{name}.retired-{uuid.uuid4().hex[:8]}"
                (final / MANIFEST_NAME).unlink(missing_ok=True)
                final.rename(retired)
                shutil.rmtree(retired, ignore_errors=True)
            staging.rename(final)
            _fsync_dir(self.root)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointError(
                f"cannot write checkpoint {final}: {exc.strerror or exc}; check free space and permissions"
            ) from None

    def fetch(self, key: str, dest: Path) -> tuple[int, str]:
        try:
            return _copy_and_hash(self.root / key, dest, durable=False)
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"checkpoint file {self.root / key} listed in the manifest is missing; the checkpoint is "
                "corrupt, resume from another one"
            ) from None

    def delete_step(self, name: str) -> None:
        step_dir = self.root / name
        (step_dir / MANIFEST_NAME).unlink(missing_ok=True)
        shutil.rmtree(step_dir, ignore_errors=True)

    @staticmethod
    def _write_atomic(path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        with tmp.open("wb") as fout:
            fout.write(data)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# S3 error codes that mean "the caller must fix something", never worth a retry.
_AUTH_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"})
_TRANSIENT_CODES = frozenset({"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout", "Throttling"})


def is_transient_s3_error(exc: BaseException) -> bool:
    """True for failures a retry may cure: connection trouble, timeouts, 5xx and throttling."""
    import urllib3
    from minio.error import InvalidResponseError, S3Error, ServerError

    if isinstance(exc, S3Error):
        status = getattr(exc.response, "status", 0) or 0
        return exc.code in _TRANSIENT_CODES or status >= 500
    if isinstance(exc, ServerError):
        return exc.status_code >= 500 or exc.status_code == 429
    if isinstance(exc, InvalidResponseError):
        return True  # a non-S3 answer, typically a proxy's 502/503 page
    return isinstance(exc, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError)


class _S3Backend(_Backend):
    def __init__(
        self,
        *,
        bucket: str,
        prefix: str,
        endpoint: str,
        access_key: str | None,
        secret_key: str | None,
        secure: bool,
        region: str | None,
        retry: RetryPolicy,
    ) -> None:
        import urllib3

        self.bucket, self.prefix, self.endpoint, self.retry = bucket, prefix, endpoint, retry
        self.location = f"s3://{bucket}/{prefix}".rstrip("/")
        # Our RetryPolicy is the only retry layer: urllib3's own retries would multiply it.
        no_retries = urllib3.Retry(total=0, connect=0, read=0, redirect=3, status=0, raise_on_status=False)
        self.client = s3.open_client(
            endpoint, access_key, secret_key, secure=secure, region=region,
            connect_timeout_s=retry.connect_timeout_s, read_timeout_s=retry.read_timeout_s,
            retries=no_retries, pool_size=8,
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one S3 operation under the retry policy, translating errors for the user."""
        from minio.error import S3Error

        started = time.monotonic()
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return fn()
            except Exception as exc:
                if not is_transient_s3_error(exc):
                    if isinstance(exc, S3Error):
                        raise self._permanent_error(what, exc) from None
                    if isinstance(exc, OSError):  # a local file, e.g. a source that vanished
                        raise CheckpointError(f"{what}: {_one_line(exc)}") from None
                    if isinstance(exc, ValueError):  # the SDK refusing a name before sending anything
                        raise StoreConfigError(f"S3 {what}: {exc}; fix {URI_FIELD}") from None
                    raise
                if attempt == self.retry.attempts:
                    raise StoreUnavailableError(
                        f"S3 endpoint {self.endpoint} failed while {what} "
                        f"({self.retry.attempts} attempts over {time.monotonic() - started:.1f}s; last error: "
                        f"{_one_line(exc)}); check that the endpoint is up"
                    ) from None
                delay = self.retry.backoff_s(attempt)
                log.info("S3 %s failed (%s); retry %d in %.2fs", what, _one_line(exc), attempt, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _permanent_error(self, what: str, exc: Any) -> CheckpointError:
        if exc.code == "NoSuchBucket":
            return StoreConfigError(
                f"bucket '{self.bucket}' does not exist at {self.endpoint}; create it or fix {URI_FIELD}"
            )
        status = getattr(exc.response, "status", 0)
        if exc.code in _AUTH_CODES or status in (401, 403):
            return StoreConfigError(
                f"S3 endpoint {self.endpoint} rejected the credentials for bucket '{self.bucket}' ({exc.code}); "
                f"check {ACCESS_KEY_ENV} / {SECRET_KEY_ENV} (or the store's access_key / secret_key)"
            )
        return CheckpointError(f"S3 {what} failed at {self.endpoint}: {exc.code}: {exc.message}")

    def check(self) -> None:
        if not self._call(f"checking bucket '{self.bucket}'", lambda: self.client.bucket_exists(self.bucket)):
            raise StoreConfigError(
                f"bucket '{self.bucket}' does not exist at {self.endpoint}; create it or fix {URI_FIELD}"
            )
        # HEAD on a bucket can succeed anonymously on some servers; a listing proves the keys work.
        self._call("listing the checkpoint prefix", lambda: next(iter(self._list(f"{self._key('')}")), None))

    def _list(self, prefix: str) -> Iterator[Any]:
        return iter(self.client.list_objects(self.bucket, prefix=prefix or None, recursive=True))

    def list_step_dirs(self) -> dict[int, bool]:
        root = self._key("")
        keys = self._call("listing checkpoints", lambda: [o.object_name for o in self._list(root)])
        found: dict[int, bool] = {}
        for key in keys:
            parts = key[len(root) :].split("/")
            match = _STEP_DIR.match(parts[0])
            if match and len(parts) > 1:
                step = int(match.group(1))
                found[step] = found.get(step, False) or parts[1:] == [MANIFEST_NAME]
        return found

    def read(self, key: str) -> bytes | None:
        from minio.error import S3Error

        def get() -> bytes | None:
            try:
                response = self.client.get_object(self.bucket, self._key(key))
            except S3Error as exc:
                if exc.code == "NoSuchKey":
                    return None
                raise
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._call(f"reading {self._key(key)}", get)

    def _put_bytes(self, key: str, data: bytes) -> None:
        import io

        self._call(
            f"writing {self._key(key)}",
            lambda: self.client.put_object(self.bucket, self._key(key), io.BytesIO(data), len(data)),
        )

    def write_pointer(self, data: bytes) -> None:
        self._put_bytes(POINTER_NAME, data)

    def write_step(
        self, name: str, sources: Sequence[tuple[str, Path]], manifest_for: Callable[[list[ManifestFile]], bytes]
    ) -> None:
        step_prefix = self._key(f"{name}/")
        if self._call(f"listing {step_prefix}", lambda: next(self._list(step_prefix), None)) is not None:
            self.delete_step(name)  # re-saving a step, or leftovers of a failed save: start clean
        written = []
        for rel, src in sources:
            written.append(self._upload(f"{name}/{rel}", src))
        self._put_bytes(f"{name}/{MANIFEST_NAME}", manifest_for(written))

    def _upload(self, key: str, src: Path) -> ManifestFile:
        size = src.stat().st_size

        def put() -> ManifestFile:
            with src.open("rb") as raw:
                reader = _HashingReader(raw)  # hashes exactly the bytes that are sent
                self.client.put_object(
                    self.bucket,
                    self._key(key),
                    cast(BinaryIO, reader),
                    size,
                    part_size=_S3_PART_BYTES,
                    num_parallel_uploads=2,
                )
            if reader.size != size:
                raise CheckpointError(f"{src} changed size during upload ({size} -> {reader.size} bytes)")
            return ManifestFile(key.split("/", 1)[1], size, reader.sha256.hexdigest())

        return self._call(f"uploading {self._key(key)} ({size} bytes)", put)

    def fetch(self, key: str, dest: Path) -> tuple[int, str]:
        from minio.error import S3Error

        def get() -> tuple[int, str]:
            try:
                response = self.client.get_object(self.bucket, self._key(key))
            except S3Error as exc:
                if exc.code == "NoSuchKey":
                    raise CorruptCheckpointError(
                        f"checkpoint file {self.location}/{key} listed in the manifest is missing; the "
                        "checkpoint is corrupt, resume from another one"
                    ) from None
                raise
            try:
                digest, size = hashlib.sha256(), 0
                with dest.open("wb") as fout:  # "wb": a retry starts the file over
                    for chunk in response.stream(_CHUNK_BYTES):
                        digest.update(chunk)
                        fout.write(chunk)
                        size += len(chunk)
                return size, digest.hexdigest()
            finally:
                response.close()
                response.release_conn()

        return self._call(f"downloading {self._key(key)}", get)

    def delete_step(self, name: str) -> None:
        from minio.deleteobjects import DeleteObject

        manifest = self._key(f"{name}/{MANIFEST_NAME}")
        self._call(f"deleting {manifest}", lambda: self.client.remove_object(self.bucket, manifest))
        step_prefix = self._key(f"{name}/")

        def remove_rest() -> None:
            keys = [o.object_name for o in self._list(step_prefix)]
            errors = list(self.client.remove_objects(self.bucket, (DeleteObject(k) for k in keys)))
            if errors:
                raise CheckpointError(f"could not delete {len(errors)} objects under {step_prefix}: {errors[0]}")

        self._call(f"deleting {step_prefix}", remove_rest)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


# ------------------------------------------------------------------------------------------- store


class CheckpointStore:
    """One interface over ``file://`` and ``s3://`` checkpoint roots; see the module docstring."""

    def __init__(self, backend: _Backend, *, keep_last: int = 3, best_mode: BestMode = BestMode.MAX) -> None:
        if keep_last < 1:
            raise ConfigError(f"checkpoint keep_last: must be >= 1, got {keep_last}")
        self._backend = backend
        self.keep_last = keep_last
        self.best_mode = BestMode(best_mode)

    @property
    def location(self) -> str:
        return self._backend.location

    @classmethod
    def from_uri(
        cls,
        uri: str,
        *,
        endpoint: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        secure: bool = False,
        region: str | None = None,
        keep_last: int = 3,
        best_mode: BestMode = BestMode.MAX,
        retry: RetryPolicy | None = None,
        validate: bool = True,
    ) -> CheckpointStore:
        """Open ``file:///abs/dir`` (or a plain path) or ``s3://bucket/prefix``.

        For S3, ``endpoint`` (``host:port``, or a URL whose scheme sets ``secure``), and the keys
        default to ``$FLOWLANE_S3_ENDPOINT``, ``$AWS_ACCESS_KEY_ID``, ``$AWS_SECRET_ACCESS_KEY``.
        With ``validate`` (the default) the bucket and credentials are checked now, so a typo
        fails at startup rather than at the first checkpoint hours later.
        """
        backend = _backend_for(
            uri,
            endpoint=endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            retry=retry or RetryPolicy(),
        )
        if validate:
            backend.check()
        return cls(backend, keep_last=keep_last, best_mode=best_mode)

    # -- writing

    def save(self, step: int, source_dir: Path, meta: Mapping[str, Any], metric: float | None = None) -> CheckpointRef:
        """Store every file under ``source_dir`` as checkpoint ``step``; manifest last, then ``latest``.

        Raises :class:`CheckpointError` when the checkpoint could not be written (the previous
        complete checkpoint stays the latest) and :class:`ConfigError` for bad arguments.
        """
        source_dir = Path(source_dir)
        sources = _collect_sources(source_dir)
        if step < 0 or step > 99_999_999:
            raise ConfigError(f"checkpoint step: must be in [0, 99999999], got {step}")
        try:
            meta_json = json.loads(json.dumps(dict(meta)))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"checkpoint meta must be JSON-serializable: {exc}") from None
        if metric is not None and not math.isfinite(metric):
            log.warning("checkpoint step %d: metric %r is not finite; stored without a metric", step, metric)
            metric = None
        name = step_dir_name(step)
        manifest_holder: list[bytes] = []

        def manifest_for(files: list[ManifestFile]) -> bytes:
            manifest_holder.append(build_manifest(step, files, meta_json, metric, time.time()))
            return manifest_holder[-1]

        self._backend.write_step(name, sources, manifest_for)
        ref = parse_manifest(manifest_holder[-1], step, f"{self.location}/{name}")
        pointer = {"step": step, "path": name, "updated_at": datetime.now(UTC).isoformat()}
        try:
            self._backend.write_pointer(json.dumps(pointer).encode())
        except CheckpointError as exc:
            raise type(exc)(f"checkpoint {ref.uri} is complete but the latest pointer was not updated: {exc}") from None
        try:
            self._apply_retention(just_saved=step)
        except CheckpointError as exc:  # the checkpoint is safe; old ones linger until the next save
            log.warning("checkpoint retention at %s skipped: %s", self.location, exc)
        return ref

    def delete(self, ref: CheckpointRef) -> None:
        """Remove a checkpoint (its manifest first, so it is never seen half-deleted)."""
        self._backend.delete_step(ref.name)

    def _apply_retention(self, just_saved: int) -> None:
        dirs = self._backend.list_step_dirs()
        complete = {ref.step: ref.metric for ref in self._complete_refs(dirs, warn=False)}
        keep = select_retained(complete, self.keep_last, self.best_mode, must_keep={just_saved})
        for step in sorted(complete.keys() - keep):
            log.info("checkpoint retention: deleting %s/%s", self.location, step_dir_name(step))
            self._backend.delete_step(step_dir_name(step))
        # Directories without any manifest, older than this save, are leftovers of failed saves.
        # Steps whose manifest exists but is corrupt are left alone for a human to look at.
        for step, has_manifest in sorted(dirs.items()):
            if not has_manifest and step < just_saved:
                log.info("checkpoint retention: removing incomplete %s/%s", self.location, step_dir_name(step))
                self._backend.delete_step(step_dir_name(step))

    # -- reading

    def get(self, step: int) -> CheckpointRef:
        """The checkpoint at ``step``; :class:`CheckpointError` if absent, ``Corrupt...`` if broken."""
        name = step_dir_name(step)
        data = self._backend.read(f"{name}/{MANIFEST_NAME}")
        uri = f"{self.location}/{name}"
        if data is None:
            raise CheckpointError(f"no complete checkpoint at step {step} in {self.location} (no {MANIFEST_NAME})")
        return parse_manifest(data, step, uri)

    def list(self) -> builtins.list[CheckpointRef]:
        """Every complete checkpoint, oldest step first. Corrupt ones are skipped with a warning."""
        return self._complete_refs(self._backend.list_step_dirs(), warn=True)

    def _complete_refs(self, dirs: Mapping[int, bool], *, warn: bool) -> builtins.list[CheckpointRef]:
        refs = []
        for step in sorted(s for s, has_manifest in dirs.items() if has_manifest):
            try:
                refs.append(self.get(step))
            except CorruptCheckpointError as exc:
                if warn:
                    log.warning("skipping %s", exc)
        return refs

    def latest(self) -> CheckpointRef | None:
        """The checkpoint the ``latest`` pointer names if it is complete, else the newest complete one."""
        raw = self._backend.read(POINTER_NAME)
        if raw is not None:
            try:
                step = json.loads(raw)["step"]
                if not isinstance(step, int):
                    raise TypeError(step)
                return self.get(step)
            except StoreUnavailableError:
                raise
            except (ValueError, KeyError, TypeError, CheckpointError) as exc:
                log.warning(
                    "checkpoint pointer %s/%s unusable (%s); using the newest complete checkpoint",
                    self.location,
                    POINTER_NAME,
                    exc,
                )
        dirs = self._backend.list_step_dirs()
        for step in sorted((s for s, m in dirs.items() if m), reverse=True):
            try:
                return self.get(step)
            except CorruptCheckpointError as exc:
                log.warning("skipping %s", exc)
        return None

    def best(self) -> CheckpointRef | None:
        """The complete checkpoint with the best metric (ties: the newer), or None if none has one."""
        refs = {ref.step: ref for ref in self.list()}
        best = pick_best({step: ref.metric for step, ref in refs.items()}, self.best_mode)
        return None if best is None else refs[best]

    def verify_compatible(self, ref: CheckpointRef, expected_model_meta: Mapping[str, Any]) -> None:
        """Raise :class:`IncompatibleCheckpointError` if ``ref`` was saved for another model."""
        check_compatible(ref, expected_model_meta)

    def download(self, ref: CheckpointRef, dest_dir: Path, *, expected_meta: Mapping[str, Any] | None = None,
                 skip: Callable[[str], bool] | None = None) -> Path:
        """Fetch ``ref`` into ``dest_dir`` (absent or empty), verifying every file's sha256;
        files whose manifest path ``skip`` is true for are left out (``is_training_state``).

        Files land in a hidden sibling directory first and are renamed into place only when all
        of them verified, so ``dest_dir`` never holds a partial or corrupt checkpoint.
        """
        if expected_meta is not None:
            check_compatible(ref, expected_meta)
        dest_dir = Path(dest_dir)
        if dest_dir.exists() and (not dest_dir.is_dir() or any(dest_dir.iterdir())):
            raise ConfigError(f"download destination {dest_dir} exists and is not an empty directory")
        dest_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = dest_dir.parent / f".{dest_dir.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            staging.mkdir()
            for entry in ref.files:
                if skip is not None and skip(entry.path):
                    continue
                target = staging / entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                size, digest = self._backend.fetch(f"{ref.name}/{entry.path}", target)
                if (size, digest) != (entry.size, entry.sha256):
                    raise CorruptCheckpointError(
                        f"checkpoint {ref.uri}: {entry.path} has {size} bytes / sha256 {digest[:12]}..., the "
                        f"manifest says {entry.size} bytes / {entry.sha256[:12]}...; resume from another checkpoint"
                    )
            if dest_dir.exists():
                dest_dir.rmdir()
            staging.rename(dest_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return dest_dir


def open_checkpoint(uri: str, **store_options: Any) -> tuple[CheckpointStore, CheckpointRef]:
    """The checkpoint ``uri`` names, with its store: ``<root>/step-NNNNNNNN`` (what a FlowRun's
    ``status.lastCheckpoint`` reports), or a checkpoint root, meaning its latest complete one."""
    root, _, last = uri.rstrip("/").rpartition("/")
    match = _STEP_DIR.match(last)
    if match and root and not root.endswith(":/"):
        store = CheckpointStore.from_uri(root, **store_options)
        return store, store.get(int(match.group(1)))
    store = CheckpointStore.from_uri(uri, **store_options)
    ref = store.latest()
    if ref is None:
        raise CheckpointError(f"no complete checkpoint under {uri}; name a checkpoint (<root>/step-NNNNNNNN) "
                              "or a root a FlowRun has written to")
    return store, ref


def _collect_sources(source_dir: Path) -> list[tuple[str, Path]]:
    if not source_dir.is_dir():
        raise ConfigError(f"checkpoint source {source_dir} is not a directory")
    sources = sorted(
        (path.relative_to(source_dir).as_posix(), path) for path in source_dir.rglob("*") if path.is_file()
    )
    if not sources:
        raise ConfigError(f"checkpoint source {source_dir} holds no files")
    if any(rel == MANIFEST_NAME for rel, _ in sources):
        raise ConfigError(f"checkpoint source {source_dir} contains {MANIFEST_NAME}, a name the store reserves")
    return sources


def _backend_for(
    uri: str,
    *,
    endpoint: str | None,
    access_key: str | None,
    secret_key: str | None,
    secure: bool,
    region: str | None,
    retry: RetryPolicy,
) -> _Backend:
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise StoreConfigError(
                f"{URI_FIELD} {uri!r}: a file URI needs an absolute path, e.g. file:///data/checkpoints"
            )
        path = Path(parsed.path if parsed.scheme else uri).expanduser()
        return _LocalBackend(path.resolve())
    if parsed.scheme != "s3":
        raise StoreConfigError(f"{URI_FIELD} {uri!r}: unsupported scheme {parsed.scheme!r}; use s3:// or file://")
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    if not bucket:
        raise StoreConfigError(f"{URI_FIELD} {uri!r}: missing bucket name, expected s3://bucket/prefix")
    if not _BUCKET_NAME.match(bucket):
        raise StoreConfigError(
            f"{URI_FIELD} {uri!r}: bucket name {bucket!r} is not valid "
            "(3-63 characters: lowercase letters, digits, '.', '-'; starting and ending with a letter or digit)"
        )
    endpoint = endpoint or os.environ.get(ENDPOINT_ENV)
    if not endpoint:
        raise StoreConfigError(
            f"{URI_FIELD} {uri!r} needs an S3 endpoint: pass endpoint= or set {ENDPOINT_ENV}=host:port"
        )
    endpoint, secure = s3.split_endpoint(endpoint, secure)
    region = region or s3.env_region()
    return _S3Backend(
        bucket=bucket,
        prefix=prefix,
        endpoint=endpoint,
        access_key=access_key if access_key is not None else os.environ.get(ACCESS_KEY_ENV),
        secret_key=secret_key if secret_key is not None else os.environ.get(SECRET_KEY_ENV),
        secure=secure,
        region=region,
        retry=retry,
    )
