"""The checkpoint store: one interface over ``file://`` and ``s3://`` roots; manifest last, then ``latest``.

See the package docstring for the promises (complete or invisible, verified downloads, retention).
"""

from __future__ import annotations

import builtins
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

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
from flowlane.kit.checkpoints.identity import check_compatible
from flowlane.kit.checkpoints.layout import MANIFEST_NAME, POINTER_NAME, STEP_DIR_PATTERN, step_dir_name
from flowlane.kit.checkpoints.local_backend import LocalBackend
from flowlane.kit.checkpoints.manifest import CheckpointRef, ManifestFile, build_manifest, parse_manifest
from flowlane.kit.checkpoints.retention import BestMode, pick_best, select_retained
from flowlane.kit.checkpoints.s3_backend import ACCESS_KEY_ENV, ENDPOINT_ENV, SECRET_KEY_ENV, RetryPolicy, S3Backend

log = logging.getLogger("flowlane.kit.checkpoints")  # the store's logger name, as before the split

_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class CheckpointStore:
    """One interface over ``file://`` and ``s3://`` checkpoint roots; see the module docstring."""

    def __init__(self, backend: Backend, *, keep_last: int = 3, best_mode: BestMode = BestMode.MAX) -> None:
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

    def save(self, step: int, source_dir: Path, meta: Mapping[str, Any], metric: float | None = None,
             *, parts: Sequence[ManifestFile] = ()) -> CheckpointRef:
        """Store every file under ``source_dir`` as checkpoint ``step``; manifest last, then ``latest``.

        ``parts`` are the files other writers of this step put in with :meth:`save_part` (learner
        pods that do not share this one's filesystem upload their own shards); the manifest lists
        them with this writer's files, so the checkpoint appears with all of them or not at all.

        Raises :class:`CheckpointError` when the checkpoint could not be written (the previous
        complete checkpoint stays the latest) and :class:`ConfigError` for bad arguments.
        """
        source_dir = Path(source_dir)
        sources = _collect_sources(source_dir)
        clash = sorted({rel for rel, _ in sources} & {part.path for part in parts})
        if clash:
            raise ConfigError(f"checkpoint step {step}: {clash[0]} is both in {source_dir} and in another writer's "
                              "part; each file has one writer")
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

        self._backend.write_step(name, sources, manifest_for, parts)
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

    def save_part(self, step: int, source_dir: Path) -> list[ManifestFile]:
        """Upload every file under ``source_dir`` as part of checkpoint ``step``, which stays
        invisible until the committing writer's :meth:`save` names the returned files in ``parts``."""
        sources = _collect_sources(Path(source_dir))
        return self._backend.write_part(step_dir_name(step), sources)

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
    match = STEP_DIR_PATTERN.match(last)
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
) -> Backend:
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise StoreConfigError(
                f"{URI_FIELD} {uri!r}: a file URI needs an absolute path, e.g. file:///data/checkpoints"
            )
        path = Path(parsed.path if parsed.scheme else uri).expanduser()
        return LocalBackend(path.resolve())
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
    return S3Backend(
        bucket=bucket,
        prefix=prefix,
        endpoint=endpoint,
        access_key=access_key if access_key is not None else os.environ.get(ACCESS_KEY_ENV),
        secret_key=secret_key if secret_key is not None else os.environ.get(SECRET_KEY_ENV),
        secure=secure,
        region=region,
        retry=retry,
    )
