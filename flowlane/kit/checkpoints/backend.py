"""The interface a storage backend implements: where a checkpoint's bytes go (``file://`` or S3)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

from flowlane.kit.checkpoints.manifest import ManifestFile


class Backend(ABC):
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
        self, name: str, sources: Sequence[tuple[str, Path]], manifest_for: Callable[[list[ManifestFile]], bytes],
        parts: Sequence[ManifestFile] = (),
    ) -> None:
        """Write the files, then ``manifest_for(written files and parts)`` as the manifest, last.

        ``parts`` are files of the same step that other writers put there with ``write_part``.
        """

    @abstractmethod
    def write_part(self, name: str, sources: Sequence[tuple[str, Path]]) -> list[ManifestFile]:
        """Write another writer's files of step ``name``, invisible until ``write_step`` names them."""

    @abstractmethod
    def fetch(self, key: str, dest: Path) -> tuple[int, str]:
        """Stream an object into ``dest``; return (size, sha256). Missing -> CorruptCheckpointError."""

    @abstractmethod
    def delete_step(self, name: str) -> None:
        """Remove a step directory, manifest first."""
