"""The S3 backend: every operation under a :class:`RetryPolicy`, S3 errors translated for the user.

Network trouble is expected: a transient failure (connection, timeout, 5xx, throttling) is retried
with exponential backoff until :class:`StoreUnavailableError`; a permanent one (missing bucket,
rejected credentials) is a :class:`StoreConfigError` at once.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, TypeVar, cast

from flowlane.api.errors import ConfigError
from flowlane.kit import s3
from flowlane.kit.checkpoints.backend import Backend
from flowlane.kit.checkpoints.errors import (
    URI_FIELD,
    CheckpointError,
    CorruptCheckpointError,
    StoreConfigError,
    StoreUnavailableError,
)
from flowlane.kit.checkpoints.layout import MANIFEST_NAME, POINTER_NAME, STEP_DIR_PATTERN
from flowlane.kit.checkpoints.manifest import ManifestFile

log = logging.getLogger("flowlane.kit.checkpoints")  # the store's logger name, as before the split

ENDPOINT_ENV = s3.ENDPOINT_ENV
ACCESS_KEY_ENV = s3.ACCESS_KEY_ENV
SECRET_KEY_ENV = s3.SECRET_KEY_ENV

_CHUNK_BYTES = 1 << 20
_S3_PART_BYTES = 64 << 20

T = TypeVar("T")


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


class S3Backend(Backend):
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
            match = STEP_DIR_PATTERN.match(parts[0])
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
        self, name: str, sources: Sequence[tuple[str, Path]], manifest_for: Callable[[list[ManifestFile]], bytes],
        parts: Sequence[ManifestFile] = (),
    ) -> None:
        step_prefix = self._key(f"{name}/")
        if parts:  # other writers' files are already in place: clear only what is not theirs
            keep = {self._key(f"{name}/{part.path}") for part in parts}
            self._delete_keys(step_prefix, lambda key: key not in keep)
        elif self._call(f"listing {step_prefix}", lambda: next(self._list(step_prefix), None)) is not None:
            self.delete_step(name)  # re-saving a step, or leftovers of a failed save: start clean
        written = []
        for rel, src in sources:
            written.append(self._upload(f"{name}/{rel}", src))
        self._put_bytes(f"{name}/{MANIFEST_NAME}", manifest_for([*written, *parts]))

    def write_part(self, name: str, sources: Sequence[tuple[str, Path]]) -> list[ManifestFile]:
        # Straight into the step's prefix: without the manifest, the step does not exist yet.
        return [self._upload(f"{name}/{rel}", src) for rel, src in sources]

    def _delete_keys(self, prefix: str, doomed: Callable[[str], bool]) -> None:
        from minio.deleteobjects import DeleteObject

        def remove() -> None:
            keys = [o.object_name for o in self._list(prefix) if doomed(o.object_name)]
            errors = list(self.client.remove_objects(self.bucket, (DeleteObject(k) for k in keys)))
            if errors:
                raise CheckpointError(f"could not delete {len(errors)} objects under {prefix}: {errors[0]}")

        self._call(f"deleting leftovers under {prefix}", remove)

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
