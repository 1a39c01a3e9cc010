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

A LoRA run on vLLM publishes the adapter alone (``adapter_sync``): a version is then a PEFT
adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``, a few MB where the
model is hundreds), fetched whole (``fetch_adapter``) and served by the engine as a LoRA adapter.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from flowlane.kit.checkpoints import CheckpointStore
from flowlane.kit.lora import read_adapter, write_adapter

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


def adapter_sync(lora_enabled: bool, engine_kind: str) -> bool:
    """Whether a run's policy versions are LoRA adapters alone: LoRA training (``model.lora.enabled``)
    with vLLM rollout engines, which serve adapters; other engines get the merged full weights."""
    return lora_enabled and engine_kind == "vllm"


def publish_version(store: CheckpointStore, version: int, tensors: Iterable[tuple[str, torch.Tensor]],
                    bucket_bytes: int = WEIGHT_BUCKET_BYTES, scratch: Path | None = None,
                    adapter_config: str = "") -> int:
    """Write ``tensors`` as version ``version`` (bucket files, manifest last); returns the bytes written.

    With ``adapter_config`` (the text of a PEFT ``adapter_config.json``) ``tensors`` are a LoRA
    adapter's and the version is written as a PEFT adapter directory instead of buckets.
    """
    from safetensors.torch import save_file

    if adapter_config:
        with tempfile.TemporaryDirectory(prefix="flowlane-publish-", dir=scratch) as tmp:
            total = write_adapter(Path(tmp), adapter_config, tensors)
            store.save(version, Path(tmp), {"policy_version": version, "adapter": True, "buckets": 0, "bytes": total})
        return total
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
            target = store.download(ref, Path(tmp) / str(index), skip=_all_but(wanted))
            bucket: dict[str, Any] = load_file(str(target / wanted))
            shutil.rmtree(target)
            yield bucket


def fetch_adapter(store: CheckpointStore, version: int,
                  scratch: Path | None = None) -> tuple[str, dict[str, torch.Tensor]] | None:
    """Version ``version``'s adapter (config text, tensors) when it is a LoRA adapter, else None
    (full weights: read them with ``fetch_version``)."""
    ref = store.get(version)
    if not ref.meta.get("adapter"):
        return None
    with tempfile.TemporaryDirectory(prefix="flowlane-fetch-", dir=scratch) as tmp:
        config_text, tensors = read_adapter(store.download(ref, Path(tmp) / "adapter"))
    return config_text, tensors


def _all_but(wanted: str) -> Callable[[str], bool]:
    return lambda path: path != wanted


def open_weights_store(checkpoint_uri: str, endpoint: str | None = None) -> CheckpointStore:
    return CheckpointStore.from_uri(weights_store_uri(checkpoint_uri), endpoint=endpoint, keep_last=VERSIONS_KEPT)


class BucketAssembler:
    """Rebuilds the gRPC weight stream (``grpc_common.iter_weight_chunks``) a bucket at a time.

    ``feed`` each chunk in order and iterate it to the end; it yields the buckets (whole layers,
    at most ``bucket_bytes`` unless one layer is larger) that the chunk completed, so a worker can
    load each into its engine while the rest is still on the wire: a sync holds about one bucket,
    not the model. The buckets share one buffer of the largest bucket's size: a bucket's tensors are
    valid until the next ``feed`` (load or copy them first). ``finish`` checks the stream was
    complete.
    """

    def __init__(self, bucket_bytes: int = WEIGHT_BUCKET_BYTES) -> None:
        self.bucket_bytes = bucket_bytes
        self.version = 0
        self.adapter_config = ""  # the header's: a LoRA adapter's config text, "" for full weights
        self._buckets: list[list[Any]] = []  # entries of each bucket, in stream order
        self._next = 0  # index of the bucket being filled
        self._storage = bytearray()  # one buffer for every bucket, the largest one's size
        self._buffer = memoryview(self._storage)  # the current bucket's part of it
        self._start = 0  # stream offset of the current bucket's first byte
        self._received = 0
        self._total = -1

    def feed(self, chunk: Any) -> Iterator[dict[str, torch.Tensor]]:
        from flowlane.kit.grpc_common import WeightStreamError

        kind = chunk.WhichOneof("payload")
        if kind == "header":
            if self._total >= 0:
                raise WeightStreamError("weight stream has a second header")
            header = chunk.header
            self.version, self._total = header.version, header.total_bytes
            self.adapter_config = header.adapter_config
            by_name = {entry.name: entry for entry in header.tensors}
            names = layer_buckets({entry.name: entry.nbytes for entry in header.tensors}, self.bucket_bytes)
            self._buckets = [[by_name[n] for n in bucket] for bucket in names]
            offsets = [entry.offset for bucket in self._buckets for entry in bucket]
            if offsets != sorted(offsets):  # a layer's tensors are not contiguous in the stream: take it whole
                self._buckets = [sorted(header.tensors, key=lambda entry: entry.offset)]
            self._storage = bytearray(max((_span(b) for b in self._buckets), default=0))
            self._open_bucket()
            yield from self._fill(memoryview(b""), 0)
            return
        if self._total < 0:
            raise WeightStreamError("weight stream data arrived before its header")
        if chunk.offset != self._received:
            raise WeightStreamError(f"weight stream gap: expected offset {self._received}, got {chunk.offset}")
        data = memoryview(chunk.data)
        end = self._received + len(data)
        if end > self._total:
            raise WeightStreamError(f"weight stream overflows its header: {end} > {self._total} bytes")
        yield from self._fill(data, self._received)
        self._received = end

    def _fill(self, data: memoryview, offset: int) -> Iterator[dict[str, torch.Tensor]]:
        """Copy ``data`` (stream bytes from ``offset``) into the buckets it covers, handing out each
        completed one before the next is filled (they share the buffer)."""
        end = offset + len(data)
        while self._next < len(self._buckets):
            bucket_end = self._start + len(self._buffer)
            low, high = max(offset, self._start), min(end, bucket_end)
            if high > low:
                self._buffer[low - self._start:high - self._start] = data[low - offset:high - offset]
            if end < bucket_end:
                break
            yield self._take_bucket()

    def finish(self) -> None:
        from flowlane.kit.grpc_common import WeightStreamError

        if self._total < 0:
            raise WeightStreamError("weight stream ended without a header")
        if self._received != self._total or self._next < len(self._buckets):
            raise WeightStreamError(f"weight stream ended early: {self._received} of {self._total} bytes")

    def _open_bucket(self) -> None:
        if self._next < len(self._buckets):
            entries = self._buckets[self._next]
            self._start = entries[0].offset
            self._buffer = memoryview(self._storage)[:_span(entries)]

    def _take_bucket(self) -> dict[str, torch.Tensor]:
        """The current bucket's tensors (views of its buffer); the next bucket becomes current."""
        from flowlane.kit.grpc_common import _dtype_from_name

        empty = torch.empty(0, dtype=torch.uint8)
        flat = torch.frombuffer(self._buffer, dtype=torch.uint8) if len(self._buffer) else empty
        bucket: dict[str, torch.Tensor] = {}
        for entry in self._buckets[self._next]:
            dtype, shape = _dtype_from_name(entry.dtype), tuple(entry.shape)
            raw = flat[entry.offset - self._start:entry.offset - self._start + entry.nbytes]
            bucket[entry.name] = raw.view(dtype).reshape(shape) if entry.nbytes else torch.empty(shape, dtype=dtype)
        self._next += 1
        self._open_bucket()
        return bucket


def _span(entries: list[Any]) -> int:
    """Stream bytes from a bucket's first tensor to the end of its last."""
    return int(entries[-1].offset + entries[-1].nbytes - entries[0].offset)
