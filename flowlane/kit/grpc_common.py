"""What every flowlane gRPC server and client shares: auth, channels, and chunked payloads.

FlowRun components (learner, rollout workers, sandboxes) talk over plain gRPC on a cluster network
or loopback. Three things must be the same everywhere, so they live here once:

- **Auth.** Every call carries ``authorization: Bearer <token>``; a server interceptor refuses
  anything else with ``UNAUTHENTICATED`` before a servicer sees it. The token comes from
  ``FLOWLANE_GRPC_TOKEN`` or a file named by ``FLOWLANE_GRPC_TOKEN_FILE`` (a mounted Secret).
  A server without a token refuses to start rather than serve openly.
- **Channels and servers.** Modest message limits (big payloads are chunked, never one giant
  message), keepalive, quick reconnects after a peer restarts, and no ``SO_REUSEPORT`` so that a
  port in use is an error instead of two servers silently sharing it.
- **Payload chunking.** Policy weights travel as a header (version and tensor index) followed by
  raw byte chunks of bounded size; ``iter_weight_chunks`` and ``WeightAssembler`` are exact
  inverses (dtype, bfloat16 included, and shape). Trajectories travel a few per message, with
  their token ids, log-probs and masks as packed numbers and the readable rest as JSON.

torch is imported only inside the weight helpers: the sandbox server uses this module too and
must start fast without it.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from flowlane.api import learner_pb2
from flowlane.api.errors import ConfigError, FlowlaneError
from flowlane.api.trajectory import Trajectory

if TYPE_CHECKING:
    import torch

TOKEN_ENV = "FLOWLANE_GRPC_TOKEN"
TOKEN_FILE_ENV = "FLOWLANE_GRPC_TOKEN_FILE"
AUTH_METADATA_KEY = "authorization"
_BEARER = "Bearer "

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# 1 MiB: 91% of a plain loopback socket's rate, 4 MiB: 74%, 8 MiB: 62% (bench/weight_sync.py).
DEFAULT_WEIGHT_CHUNK_BYTES = 1024 * 1024
#: Largest serialized TrajectoryChunk the client helper builds (one oversized trajectory travels alone).
DEFAULT_TRAJECTORY_CHUNK_BYTES = 1024 * 1024
#: Tensor offsets in the weight stream are multiples of this, so the receiver can view its one
#: buffer as any dtype without copying (torch requires element-aligned storage offsets).
WEIGHT_ALIGNMENT_BYTES = 64

_COMMON_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    *_COMMON_OPTIONS,
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A restarted peer (a supervised pod or process) is back within seconds; do not wait minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
SERVER_OPTIONS: list[tuple[str, Any]] = [
    *_COMMON_OPTIONS,
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
]


# --- auth -------------------------------------------------------------------------------------


def resolve_token(token: str | None = None) -> str | None:
    """The shared token: ``token`` if given, else ``$FLOWLANE_GRPC_TOKEN``, else the file named by
    ``$FLOWLANE_GRPC_TOKEN_FILE``; None when none is configured."""
    if token:
        return token.strip()
    if os.environ.get(TOKEN_ENV, "").strip():
        return os.environ[TOKEN_ENV].strip()
    path = os.environ.get(TOKEN_FILE_ENV, "").strip()
    if path:
        try:
            value = Path(path).read_text().strip()
        except OSError as err:
            raise ConfigError(f"{TOKEN_FILE_ENV}={path}: cannot read the gRPC token file ({err.strerror})") from None
        if not value:
            raise ConfigError(f"{TOKEN_FILE_ENV}={path}: the gRPC token file is empty")
        return value
    return None


def require_token(token: str | None = None) -> str:
    """``resolve_token`` for servers: no token is an error, never an open server."""
    value = resolve_token(token)
    if not value:
        raise ConfigError(
            f"no gRPC token: set {TOKEN_ENV} (or {TOKEN_FILE_ENV} to a file holding it); "
            "clients must send the same token"
        )
    return value


def generate_token() -> str:
    """A fresh random token (the local backend makes one per run)."""
    return secrets.token_urlsafe(32)


def _refusing_handler(handler: grpc.RpcMethodHandler, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that aborts with UNAUTHENTICATED."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, details)

    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
    return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call whose ``authorization`` metadata is not ``Bearer <token>``."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ConfigError("TokenAuthInterceptor needs a non-empty token")
        self._expected = (_BEARER + token).encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: let grpc answer UNIMPLEMENTED
            return handler
        sent = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == AUTH_METADATA_KEY:
                sent = value.encode() if isinstance(value, str) else value
                break
        if sent is None:
            return _refusing_handler(handler, "missing 'authorization: Bearer <token>' metadata")
        if not hmac.compare_digest(sent, self._expected):
            return _refusing_handler(handler, "invalid token")
        return handler


class _TokenMetadata:
    """Adds ``authorization: Bearer <token>`` to a call's metadata."""

    def __init__(self, token: str) -> None:
        self._header = (AUTH_METADATA_KEY, _BEARER + token)

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._header)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                          details.credentials, details.wait_for_ready)


# grpc.aio files each interceptor under the first call shape it implements, so one class per shape.
class _UnaryUnaryToken(_TokenMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _UnaryStreamToken(_TokenMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _StreamUnaryToken(_TokenMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _StreamStreamToken(_TokenMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that send ``token`` on every call, whatever its shape."""
    return [cls(token) for cls in (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken, _StreamStreamToken)]


# --- channels and servers ---------------------------------------------------------------------


def open_channel(address: str, token: str | None = None) -> grpc.aio.Channel:
    """An asyncio channel to ``host:port`` that sends the shared token on every call.

    ``token=None`` resolves it from the environment; with no token at all the channel sends none
    (the server will refuse the calls, which is the honest outcome).
    """
    resolved = resolve_token(token)
    interceptors = token_interceptors(resolved) if resolved else None
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=interceptors)


def create_server(token: str | None = None, *, maximum_concurrent_rpcs: int | None = None) -> grpc.aio.Server:
    """An asyncio server that refuses unauthenticated calls. Raises ``ConfigError`` without a token."""
    return grpc.aio.server(
        interceptors=[TokenAuthInterceptor(require_token(token))],
        options=SERVER_OPTIONS,
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
    )


def bind_port(server: grpc.aio.Server, host: str, port: int) -> int:
    """Listen on ``host:port`` (0 picks a free port) and return the port actually bound."""
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise FlowlaneError(
            f"cannot listen on {host}:{port}: the port is in use or the address is not local; "
            "stop the other process or choose another port"
        )
    return bound


async def wait_for_channel(address: str, timeout_s: float) -> bool:
    """True once a gRPC server answers the HTTP/2 handshake at ``address`` within ``timeout_s``."""
    import asyncio

    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout_s)
        except TimeoutError:
            return False
    return True


# --- trajectories ----------------------------------------------------------------------------


def trajectory_to_record(
    trajectory: Trajectory, trajectory_id: str, worker_id: str = ""
) -> learner_pb2.TrajectoryRecord:
    """The wire form of a finished trajectory.

    Token ids, log-probs and masks go in packed numeric fields; the JSON blob keeps everything
    readable (text of each planner turn included) but not the token lists, so nothing is sent twice.
    A trajectory without a reward is refused: the learner cannot train on it.
    """
    if trajectory.reward is None:
        raise ValueError(f"trajectory {trajectory_id}: reward is None; score it before submitting")
    readable = trajectory.to_dict()
    for turn in readable["planner_turns"]:
        for key in ("prompt_ids", "response_ids", "logprobs"):
            turn.pop(key)
    turns = [
        learner_pb2.PlannerTurnRecord(
            prompt_ids=turn.prompt_ids,
            response_ids=turn.response_ids,
            logprobs=turn.logprobs,
            response_mask=[1] * len(turn.response_ids),
            policy_version=turn.policy_version,
        )
        for turn in trajectory.planner_turns
    ]
    return learner_pb2.TrajectoryRecord(
        trajectory_id=trajectory_id,
        question_id=trajectory.question_id,
        reward=trajectory.reward,
        turns=turns,
        worker_id=worker_id,
        trajectory_json=json.dumps(readable, ensure_ascii=False),
    )


def trajectory_from_record(record: learner_pb2.TrajectoryRecord) -> Trajectory:
    """Inverse of ``trajectory_to_record`` (the response mask is not part of ``Trajectory``)."""
    readable = json.loads(record.trajectory_json) if record.trajectory_json else {"question": ""}
    texts = readable.get("planner_turns") or [{} for _ in record.turns]
    if len(texts) != len(record.turns):
        raise ValueError(f"trajectory {record.trajectory_id}: {len(record.turns)} turn records "
                         f"but {len(texts)} readable turns")
    readable["planner_turns"] = [
        {**text, "prompt_ids": list(turn.prompt_ids), "response_ids": list(turn.response_ids),
         "logprobs": list(turn.logprobs), "policy_version": turn.policy_version}
        for text, turn in zip(texts, record.turns, strict=True)
    ]
    readable["question_id"] = record.question_id
    readable["reward"] = record.reward
    return Trajectory.from_dict(readable)


def iter_trajectory_chunks(
    records: Iterable[learner_pb2.TrajectoryRecord],
    max_chunk_bytes: int = DEFAULT_TRAJECTORY_CHUNK_BYTES,
) -> Iterator[learner_pb2.TrajectoryChunk]:
    """Pack records into ``TrajectoryChunk`` messages of at most ``max_chunk_bytes`` each.

    A record larger than the budget travels alone; one larger than the gRPC message limit is an
    error here rather than a failed RPC later.
    """
    batch: list[learner_pb2.TrajectoryRecord] = []
    size = 0
    for record in records:
        record_bytes = record.ByteSize() + 8  # field tag and length prefix
        if record_bytes > MAX_MESSAGE_BYTES:
            raise FlowlaneError(
                f"trajectory {record.trajectory_id} is {record_bytes} bytes, over the "
                f"{MAX_MESSAGE_BYTES}-byte gRPC message limit; lower the planner's max tokens or turns"
            )
        if batch and size + record_bytes > max_chunk_bytes:
            yield learner_pb2.TrajectoryChunk(trajectories=batch)
            batch, size = [], 0
        batch.append(record)
        size += record_bytes
    if batch:
        yield learner_pb2.TrajectoryChunk(trajectories=batch)


# --- weights ---------------------------------------------------------------------------------


class WeightStreamError(FlowlaneError):
    """A weight stream that does not add up (missing header, gap, wrong length, unknown dtype)."""


_WEIGHT_DTYPE_NAMES = (
    "float32", "float16", "bfloat16", "float64", "int8", "int16", "int32", "int64", "uint8", "bool",
    "float8_e4m3fn", "float8_e5m2",
)


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _WEIGHT_DTYPE_NAMES:
        raise WeightStreamError(f"dtype {name} cannot be sent as weights; supported: {', '.join(_WEIGHT_DTYPE_NAMES)}")
    return name


def _dtype_from_name(name: str) -> torch.dtype:
    import torch

    if name not in _WEIGHT_DTYPE_NAMES:
        raise WeightStreamError(f"weight stream names unknown dtype {name!r}")
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype)
    return dtype


def _align(offset: int) -> int:
    return -(-offset // WEIGHT_ALIGNMENT_BYTES) * WEIGHT_ALIGNMENT_BYTES


def iter_weight_chunks(
    named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    version: int,
    chunk_bytes: int = DEFAULT_WEIGHT_CHUNK_BYTES,
    adapter_config: str = "",
) -> Iterator[learner_pb2.WeightChunk]:
    """Stream tensors as one ``WeightsHeader`` message, then ``data`` chunks of <= ``chunk_bytes``.

    ``adapter_config`` (a PEFT ``adapter_config.json`` text) marks the tensors as a LoRA adapter's.

    The byte stream is each tensor's raw little-endian bytes at an aligned offset, zero padding
    between. Tensors are copied to the CPU one at a time as the stream reaches them, so a model
    on a GPU never needs a second full copy in host memory.
    """
    import torch

    if chunk_bytes <= 0 or chunk_bytes > MAX_MESSAGE_BYTES - 1024:
        raise ValueError(f"chunk_bytes must be in 1..{MAX_MESSAGE_BYTES - 1024}, got {chunk_bytes}")
    items = list(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
    entries = []
    offset = 0
    for name, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        offset = _align(offset)
        entries.append(learner_pb2.TensorEntry(name=name, dtype=_dtype_name(tensor.dtype),
                                               shape=list(tensor.shape), offset=offset, nbytes=nbytes))
        offset += nbytes
    total = offset
    yield learner_pb2.WeightChunk(header=learner_pb2.WeightsHeader(version=version, tensors=entries,
                                                                   total_bytes=total, adapter_config=adapter_config))

    pending = bytearray()  # bytes of the chunk being filled
    sent = 0  # stream offset of `pending`'s first byte

    def pieces() -> Iterator[memoryview]:
        position = 0
        for entry, (_, tensor) in zip(entries, items, strict=True):
            if entry.offset > position:
                yield memoryview(bytes(entry.offset - position))
            if entry.nbytes:
                flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                yield memoryview(flat.numpy()).cast("B")
            position = entry.offset + entry.nbytes

    for piece in pieces():
        start = 0
        while start < len(piece):
            if not pending and len(piece) - start >= chunk_bytes:
                yield learner_pb2.WeightChunk(data=piece[start:start + chunk_bytes].tobytes(), offset=sent)
                sent += chunk_bytes
                start += chunk_bytes
                continue
            take = min(chunk_bytes - len(pending), len(piece) - start)
            pending += piece[start:start + take]
            start += take
            if len(pending) == chunk_bytes:
                yield learner_pb2.WeightChunk(data=bytes(pending), offset=sent)
                sent += chunk_bytes
                pending = bytearray()
    if pending:
        yield learner_pb2.WeightChunk(data=bytes(pending), offset=sent)


class WeightAssembler:
    """Rebuilds ``(version, {name: tensor})`` from the chunks of ``iter_weight_chunks``.

    Feed chunks in order; ``finish`` checks the stream was complete. The tensors share one host
    buffer (no per-tensor copy); copy them into the model as usual.
    """

    def __init__(self) -> None:
        self.header: learner_pb2.WeightsHeader | None = None
        self._buffer = bytearray()
        self._received = 0

    def feed(self, chunk: learner_pb2.WeightChunk) -> None:
        kind = chunk.WhichOneof("payload")
        if kind == "header":
            if self.header is not None:
                raise WeightStreamError("weight stream has a second header")
            self.header = chunk.header
            self._buffer = bytearray(chunk.header.total_bytes)
            return
        if self.header is None:
            raise WeightStreamError("weight stream data arrived before its header")
        if kind != "data":
            raise WeightStreamError("weight stream chunk has neither header nor data")
        if chunk.offset != self._received:
            raise WeightStreamError(f"weight stream gap: expected offset {self._received}, got {chunk.offset}")
        end = self._received + len(chunk.data)
        if end > len(self._buffer):
            raise WeightStreamError(f"weight stream overflows its header: {end} > {len(self._buffer)} bytes")
        self._buffer[self._received:end] = chunk.data
        self._received = end

    def finish(self) -> tuple[int, dict[str, torch.Tensor]]:
        import torch

        if self.header is None:
            raise WeightStreamError("weight stream ended without a header")
        if self._received != self.header.total_bytes:
            raise WeightStreamError(
                f"weight stream ended early: {self._received} of {self.header.total_bytes} bytes"
            )
        flat = torch.frombuffer(self._buffer, dtype=torch.uint8) if self._buffer else torch.empty(0, dtype=torch.uint8)
        tensors: dict[str, torch.Tensor] = {}
        for entry in self.header.tensors:
            dtype = _dtype_from_name(entry.dtype)
            shape = tuple(entry.shape)
            if entry.nbytes == 0:
                tensors[entry.name] = torch.empty(shape, dtype=dtype)
                continue
            raw = flat[entry.offset:entry.offset + entry.nbytes]
            tensors[entry.name] = raw.view(dtype).reshape(shape)
        return self.header.version, tensors


def assemble_weights(chunks: Iterable[learner_pb2.WeightChunk]) -> tuple[int, dict[str, torch.Tensor]]:
    """Inverse of ``iter_weight_chunks`` for an in-memory sequence of chunks."""
    assembler = WeightAssembler()
    for chunk in chunks:
        assembler.feed(chunk)
    return assembler.finish()


async def assemble_weights_async(
    chunks: AsyncIterable[learner_pb2.WeightChunk],
) -> tuple[int, dict[str, torch.Tensor]]:
    """``assemble_weights`` for a gRPC response stream (``stub.GetWeights(request)``)."""
    assembler = WeightAssembler()
    async for chunk in chunks:
        assembler.feed(chunk)
    return assembler.finish()
