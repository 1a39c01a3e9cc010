"""The manifest: the file written last into a checkpoint, listing each file's size and sha256.

A step without a valid manifest does not exist. :func:`parse_manifest` is strict: anything odd is a
:class:`CorruptCheckpointError`, never repaired.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

from flowlane.kit.checkpoints.errors import CorruptCheckpointError
from flowlane.kit.checkpoints.layout import MANIFEST_NAME, step_dir_name

MANIFEST_FORMAT = "flowlane-checkpoint/1"


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
