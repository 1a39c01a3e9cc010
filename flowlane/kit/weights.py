"""Policy versions published through the checkpoint store (``engine.weightSync: store``).

With the gRPC stream the learner sends every version once per worker: 16 workers of a 7B model
are 16 x 15 GB through the learner's NIC per step. With the store the learner writes a version
once and the workers fetch it in parallel from the store (MinIO or S3 scale out; a shared
filesystem for ``file://``), so the learner's cost no longer grows with the worker count.

A version is an ordinary store entry (step number = policy version) of bucket files, each a
safetensors file of whole layers (vLLM reloads a layer only with all its tensors), written with
the store's guarantees: every file first, the manifest last, so a worker sees a version complete
or not at all. Workers fetch and load one bucket at a time, so a sync holds about one bucket in
memory, not the model. The store keeps the newest few versions; older ones are deleted.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from flowlane.kit.checkpoints import CheckpointStore

#: Upper bound of one bucket (one file of a published version; one staged load in the engine).
WEIGHT_BUCKET_BYTES = 32 * 1024 * 1024
#: Versions kept in the store: the newest, and the one workers may still be fetching.
VERSIONS_KEPT = 2

_LAYER = re.compile(r"^(.*?\.layers\.\d+)\.")


def layer_buckets(sizes: Mapping[str, int], bucket_bytes: int) -> list[list[str]]:
    """Tensor names (in order, with their byte sizes) grouped into buckets of whole layers.

    A transformer block (``...layers.N.*``) is never split; other tensors (embeddings, final
    norm, head) group by their module. Groups are packed in order up to ``bucket_bytes``; a
    group larger than that is a bucket of its own.
    """
    groups: dict[str, list[str]] = {}
    for name in sizes:
        match = _LAYER.match(name)
        groups.setdefault(match.group(1) if match else name.rsplit(".", 1)[0], []).append(name)
    buckets: list[list[str]] = []
    size = 0
    for names in groups.values():
        group_bytes = sum(sizes[n] for n in names)
        if buckets and size + group_bytes <= bucket_bytes:
            buckets[-1].extend(names)
            size += group_bytes
        else:
            buckets.append(list(names))
            size = group_bytes
    return buckets


def checkpoint_root(checkpoint_uri: str | None, run_dir: Path) -> str:
    """The run's checkpoint store: ``storage.checkpointUri``, by default ``<run dir>/checkpoints``."""
    return checkpoint_uri or (Path(run_dir) / "checkpoints").resolve().as_uri()


def weights_store_uri(checkpoint_uri: str) -> str:
    """Where published versions go: next to the checkpoints (``<root>-weights``), not inside them."""
    root = checkpoint_uri.rstrip("/")
    if root.startswith("s3://") and "/" not in root.removeprefix("s3://"):
        return f"{root}/weights"
    return f"{root}-weights"


def bucket_file(index: int) -> str:
    return f"bucket-{index:05d}.safetensors"


def publish_version(store: CheckpointStore, version: int, tensors: Iterable[tuple[str, torch.Tensor]],
                    bucket_bytes: int = WEIGHT_BUCKET_BYTES, scratch: Path | None = None) -> int:
    """Write ``tensors`` as version ``version`` (bucket files, manifest last); returns the bytes written."""
    from safetensors.torch import save_file

    named = [(name, tensor.detach().cpu().contiguous()) for name, tensor in tensors]
    by_name = dict(named)
    buckets = layer_buckets({n: t.numel() * t.element_size() for n, t in named}, bucket_bytes)
    total = 0
    with tempfile.TemporaryDirectory(prefix="flowlane-publish-", dir=scratch) as tmp:
        for index, names in enumerate(buckets):
            save_file({n: by_name[n] for n in names}, str(Path(tmp) / bucket_file(index)))
            total += sum(by_name[n].numel() * by_name[n].element_size() for n in names)
        store.save(version, Path(tmp), {"policy_version": version, "buckets": len(buckets), "bytes": total})
    return total


def fetch_version(store: CheckpointStore, version: int,
                  scratch: Path | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Version ``version``'s buckets, one at a time (fetched, verified, loaded, its file removed)."""
    from safetensors.torch import load_file

    ref = store.get(version)
    count = int(ref.meta.get("buckets", 0))
    with tempfile.TemporaryDirectory(prefix="flowlane-fetch-", dir=scratch) as tmp:
        for index in range(count):
            wanted = bucket_file(index)
            target = store.download(ref, Path(tmp) / str(index), skip=lambda path, w=wanted: path != w)
            bucket: dict[str, Any] = load_file(str(target / wanted))
            shutil.rmtree(target)
            yield bucket


def open_weights_store(checkpoint_uri: str, endpoint: str | None = None) -> CheckpointStore:
    return CheckpointStore.from_uri(weights_store_uri(checkpoint_uri), endpoint=endpoint, keep_last=VERSIONS_KEPT)
