"""Weight sync: how fast a policy version reaches a rollout worker, and what it costs the worker.

    .venv/bin/python bench/weight_sync.py [--mb 256] [--repeats 3] [--chunk-mb 4 16] [--only transport|engine]

Two processes, as in a run: this one plays the learner (a gRPC server with the production
``GetWeights`` stream, ``iter_weight_chunks`` and the token interceptor; a plain TCP socket that
sends the same bytes; the weights store it publishes into), a child plays the rollout worker
(``assemble_weights_async`` as the worker does; ``recv_into`` one buffer for the socket;
``fetch_version`` bucket by bucket for the store). Rounds are interleaved so load on the shared
machine falls on every path alike; the median round is reported.

- MB/s: bytes of weights over wall time, from the request to the last byte in worker memory
  (for the store: copied into the worker's weights, as the engine does with each bucket).
- rows: ``grpc-N``: the whole stream assembled in one buffer (N MiB chunks; the worker before
  this change); ``grpc, buckets``: the worker now, each bucket of whole layers copied into its
  weights as soon as its last byte arrived; ``socket``: the transport's ceiling, raw bytes
  through one reused 4 MiB buffer (``into one new buffer``: into a fresh model-sized buffer, the
  like-for-like baseline of ``grpc-N``); ``store``:
  fetched bucket by bucket from a ``file://`` store, copied into the weights.
- peak extra MiB: the worker's peak resident memory during the sync above its resident memory
  before it (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``), next to the
  largest bucket. A vLLM engine stages each bucket once more in ``/dev/shm`` (not counted here).
- The projection for 7B and 70B models (bf16) at 8 and 64 workers uses only the rates measured:
  gRPC, the learner serialises every worker's stream: ``t = N x S / R_grpc``; the store, the
  learner writes once and workers read in parallel from a store that scales out (S3/MinIO):
  ``t = S / R_write + S / R_read``. Both ignore the network, which only lowers them.

Full weights vs LoRA (``--only engine``), on the bundled model and real vLLM engines: the learner
process serves the bundled SmolLM2-135M's full weights (float32) and a rank-16 LoRA adapter on the
attention projections (``model.lora``'s defaults, lora_B random) over the same ``GetWeights``
stream, and publishes both to a ``file://`` weights store; the worker process syncs them with the
rollout worker's own code (``pull_weights``, ``fetch_weights``) into a running vLLM engine: the
full weights into a plain engine, the adapter into one started with LoRA (``max_lora_rank`` 16).
Per sync: the bytes moved, the wall time from request to the engine serving the version, and of
that the time inside the engine's load call (``load_weights`` per bucket; ``load_adapter``: staging
the PEFT directory and vLLM's ``add_lora``). Also the engines' start time and greedy decode rate
(8 concurrent requests x 32 tokens), the LoRA engine with and without its adapter: vLLM's CPU
build turns compilation off when LoRA is on (the engines here run eager anyway), so this is what
LoRA costs at generation time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import markdown_table, print_header

from flowlane.kit.weights import (
    WEIGHT_BUCKET_BYTES,
    fetch_version,
    layer_buckets,
    open_weights_store,
    publish_version,
)

MODELS = {"7B": 7.6e9, "70B": 70.6e9}  # parameters (Qwen2.5-7B, Llama-3-70B); bf16: 2 bytes each
WORKERS = (8, 64)


def model_like(total_mb: int) -> dict[str, torch.Tensor]:
    """bf16 tensors with transformer names and shapes: an embedding and layers of 7 projections."""
    hidden = 1024
    state = {"model.embed_tokens.weight": torch.randn(8192, hidden).to(torch.bfloat16)}
    per_layer = (4 * hidden * hidden + 3 * hidden * 2816) * 2
    for i in range(max(1, (total_mb * 2**20 - 8192 * hidden * 2) // per_layer)):
        prefix = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[f"{prefix}.self_attn.{name}.weight"] = torch.randn(hidden, hidden).to(torch.bfloat16)
        for name, shape in (("gate_proj", (2816, hidden)), ("up_proj", (2816, hidden)),
                            ("down_proj", (hidden, 2816))):
            state[f"{prefix}.mlp.{name}.weight"] = torch.randn(*shape).to(torch.bfloat16)
    state["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    return state


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


# -- the worker side (child process) ------------------------------------------------------------


def _reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _peak_extra_mib(before_kib: int) -> float:
    return max(0, _status_kib("VmHWM") - before_kib) / 1024


async def _grpc_round(address: str, token: str, chunk_bytes: int) -> tuple[float, int, float]:
    from flowlane.api import learner_pb2, learner_pb2_grpc
    from flowlane.kit.grpc_common import assemble_weights_async, open_channel

    async with open_channel(address, token) as channel:
        stub = learner_pb2_grpc.LearnerStub(channel)
        await stub.GetStatus(learner_pb2.StatusRequest())  # connect outside the timing
        before = _reset_peak()
        started = time.perf_counter()
        _, tensors = await assemble_weights_async(
            stub.GetWeights(learner_pb2.WeightsRequest(min_version=1, chunk_bytes=chunk_bytes)))
        took = time.perf_counter() - started
        size = nbytes(tensors)
        del tensors
        return took, size, _peak_extra_mib(before)


async def _grpc_buckets_round(address: str, token: str, model: dict[str, torch.Tensor]) -> tuple[float, int, float]:
    """What the rollout worker does: each bucket of whole layers into the weights as it arrives."""
    from flowlane.api import learner_pb2, learner_pb2_grpc
    from flowlane.kit.grpc_common import DEFAULT_WEIGHT_CHUNK_BYTES, open_channel
    from flowlane.kit.weights import BucketAssembler

    async with open_channel(address, token) as channel:
        stub = learner_pb2_grpc.LearnerStub(channel)
        await stub.GetStatus(learner_pb2.StatusRequest())
        before = _reset_peak()
        started = time.perf_counter()
        assembler, size = BucketAssembler(), 0
        request = learner_pb2.WeightsRequest(min_version=1, chunk_bytes=DEFAULT_WEIGHT_CHUNK_BYTES)
        async for chunk in stub.GetWeights(request):
            for bucket in assembler.feed(chunk):
                for name, tensor in bucket.items():
                    model[name].copy_(tensor)
                size += nbytes(bucket)
                del bucket
        assembler.finish()
        return time.perf_counter() - started, size, _peak_extra_mib(before)


def _socket_round(port: int, whole: bool) -> tuple[float, int, float]:
    """Raw bytes through ``recv_into``: one reused 4 MiB buffer (the transport's ceiling), or with
    ``whole`` one new buffer of the model's size (as the stream assembled whole was received)."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        before = _reset_peak()
        started = time.perf_counter()
        header = b""
        while len(header) < 8:
            header += conn.recv(8 - len(header))
        total = int.from_bytes(header, "little")
        buffer = bytearray(total if whole else 4 << 20)
        view = memoryview(buffer)
        received = 0
        while received < total:
            target = view[received:] if whole else view
            got = conn.recv_into(target, min(total - received, 4 << 20))
            if not got:
                raise ConnectionError("socket closed early")
            received += got
        took = time.perf_counter() - started
        return took, total, _peak_extra_mib(before)


def _store_round(uri: str, model: dict[str, torch.Tensor]) -> tuple[float, int, float]:
    """Each bucket is copied into ``model`` (the engine's weights, allocated before), which also
    makes sure every byte was read: safetensors maps the file and reads lazily."""
    store = open_weights_store(uri)
    before = _reset_peak()
    started = time.perf_counter()
    size = 0
    for bucket in fetch_version(store, 1):
        for name, tensor in bucket.items():
            model[name].copy_(tensor)
        size += nbytes(bucket)
        del bucket
    return time.perf_counter() - started, size, _peak_extra_mib(before)


# -- full weights vs LoRA into a real vLLM engine ---------------------------------------------------

LORA_RANK, LORA_ALPHA, LORA_TARGETS = 16, 32, ("q_proj", "k_proj", "v_proj", "o_proj")
ADAPTER_VERSIONS = 1000  # versions from here on are the adapter's, below the full weights'
DECODE = {"requests": 8, "max_tokens": 32}


def bundled_policy() -> tuple[Path, dict[str, torch.Tensor], str, dict[str, torch.Tensor]]:
    """The bundled model's directory and full weights, and a LoRA adapter on it (config text, tensors)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from flowlane.kit.lora import adapter_config_text
    from flowlane.kit.models import resolve_model

    model_dir = resolve_model("smollm2-135m-instruct")
    full = load_file(str(model_dir / "model.safetensors"))
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32),
                          LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS),
                                     lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    adapter = {n: t.detach().clone().contiguous() for n, t in get_peft_model_state_dict(peft).items()}
    return model_dir, full, adapter_config_text(peft.peft_config["default"]), adapter


async def _decode_rate(engine: Any) -> float:
    """Generated tokens per second of ``DECODE['requests']`` concurrent greedy requests."""
    from flowlane.runtime.engines.base import SamplingSettings

    settings = SamplingSettings(max_tokens=DECODE["max_tokens"], temperature=0.0)
    prompts = [[{"role": "user", "content": f"Count from {i} to {i + 40}, one number per line."}]
               for i in range(DECODE["requests"])]
    await engine.chat(prompts[0], settings)  # warm-up outside the timing
    started = time.perf_counter()
    gens = await asyncio.gather(*(engine.chat(p, settings) for p in prompts))
    return sum(len(g.token_ids) for g in gens) / (time.perf_counter() - started)


async def _engine_worker(args: argparse.Namespace) -> dict[str, Any]:
    from flowlane.api import learner_pb2_grpc
    from flowlane.kit.grpc_common import open_channel
    from flowlane.kit.weights import open_weights_store
    from flowlane.runtime.engines.vllm_engine import VLLMEngine
    from flowlane.runtime.rollout.worker import fetch_weights, pull_weights

    store = open_weights_store(args.store)
    out: dict[str, Any] = {"syncs": {}, "engines": {}}
    kinds = (("full weights", None), ("LoRA adapter", LORA_RANK))
    # Both engines start together (each start is mostly one process's CPU: on a shared machine two
    # at once take little longer than one); the rows below then run one engine at a time.
    started = time.perf_counter()
    engines = await asyncio.gather(*(asyncio.to_thread(VLLMEngine, args.model, max_model_len=1024, kv_cache_gib=0.5,
                                                       max_num_seqs=8, max_lora_rank=lora) for _, lora in kinds))
    start_s = time.perf_counter() - started
    async with open_channel(args.grpc, args.token) as channel:
        stub = learner_pb2_grpc.LearnerStub(channel)
        for (kind, lora), engine in zip(kinds, engines, strict=True):
            first = ADAPTER_VERSIONS if lora else 1
            for path in ("grpc", "store"):
                for version in range(first, first + args.repeats):
                    before = time.perf_counter()
                    synced = (await pull_weights(stub, engine, version) if path == "grpc"
                              else await fetch_weights(store, engine, first))
                    out["syncs"].setdefault(f"{kind}, {path}", []).append(
                        [time.perf_counter() - before, synced.nbytes, synced.engine_s])
            rates = {kind: await _decode_rate(engine)}
            if lora:
                rates["LoRA engine, base model (no adapter)"] = await _decode_rate(engine.base_model())
            out["engines"][kind] = {"start_s": start_s, "tokens_per_s": rates}
    for engine in engines:
        await engine.close()
    return out


def engine_worker_main(args: argparse.Namespace) -> None:
    print(json.dumps(asyncio.run(_engine_worker(args))))


async def engine_rows(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The learner side of the full-vs-LoRA rows: serve and publish both, run the engine worker."""
    from flowlane.api import learner_pb2, learner_pb2_grpc
    from flowlane.kit.grpc_common import bind_port, create_server, iter_weight_chunks

    model_dir, full, adapter_config, adapter = bundled_policy()
    token = "bench-token"

    class Servicer(learner_pb2_grpc.LearnerServicer):
        async def GetWeights(self, request: Any, context: Any) -> Any:
            lora = request.min_version >= ADAPTER_VERSIONS
            tensors, config = (adapter, adapter_config) if lora else (full, "")
            for chunk in iter_weight_chunks(tensors, request.min_version, request.chunk_bytes or 1 << 20, config):
                yield chunk

        async def GetStatus(self, request: Any, context: Any) -> Any:
            return learner_pb2.LearnerStatus()

    server = create_server(token)
    learner_pb2_grpc.add_LearnerServicer_to_server(Servicer(), server)
    port = bind_port(server, "127.0.0.1", 0)
    await server.start()
    with tempfile.TemporaryDirectory(prefix="bench-weights-") as tmp:
        uri = (Path(tmp) / "checkpoints").as_uri()
        store = open_weights_store(uri)
        publish_version(store, 1, full.items(), scratch=Path(tmp))
        publish_version(store, ADAPTER_VERSIONS, adapter.items(), scratch=Path(tmp), adapter_config=adapter_config)
        command = [sys.executable, __file__, "--engine-worker", "--grpc", f"127.0.0.1:{port}", "--token", token,
                   "--store", uri, "--repeats", str(args.repeats), "--model", str(model_dir)]
        child = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE)
        out, _ = await child.communicate()
    await server.stop(grace=None)
    if child.returncode:
        raise SystemExit(f"engine worker failed ({child.returncode})")
    measured = json.loads(out.decode().strip().splitlines()[-1])
    rows = []
    for path, rounds in measured["syncs"].items():
        seconds = statistics.median(r[0] for r in rounds)
        rows.append({"sync": path, "MB per sync": rounds[0][1] / 1e6, "seconds per sync": seconds,
                     "engine load s": statistics.median(r[2] for r in rounds),
                     "MB/s": rounds[0][1] / 1e6 / seconds})
    full_bytes, adapter_bytes = nbytes(full), nbytes(adapter)
    for row in rows:
        row["of the model's bytes"] = f"{row['MB per sync'] * 1e6 / full_bytes:.1%}"
    engines = []
    for info in measured["engines"].values():
        for label, rate in info["tokens_per_s"].items():
            engines.append({"engine": "plain (no LoRA)" if label == "full weights" else
                            "LoRA, with its adapter" if label == "LoRA adapter" else "LoRA, base model (no adapter)",
                            "greedy tokens/s": rate})
    print(f"both engines started together in {measured['engines']['full weights']['start_s']:.0f} s")
    print(f"adapter: rank {LORA_RANK} on {', '.join(LORA_TARGETS)}, {len(adapter)} tensors, "
          f"{adapter_bytes / 1e6:.2f} MB; model {full_bytes / 1e6:.1f} MB ({full_bytes / adapter_bytes:.0f}x)\n")
    return rows, engines


def worker_main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    rows: dict[str, list[tuple[float, int, float]]] = {}
    model = model_like(args.mb)  # the worker's own weights, there before any sync
    for _ in range(args.repeats):
        for chunk_mb in args.chunk_mb:
            rows.setdefault(f"grpc-{chunk_mb}", []).append(
                asyncio.run(_grpc_round(args.grpc, args.token, chunk_mb * 2**20)))
        rows.setdefault("grpc, buckets into weights (worker)", []).append(
            asyncio.run(_grpc_buckets_round(args.grpc, args.token, model)))
        rows.setdefault("socket", []).append(_socket_round(args.socket, whole=False))
        rows.setdefault("socket, into one new buffer", []).append(_socket_round(args.socket, whole=True))
        rows.setdefault("store", []).append(_store_round(args.store, model))
    print(json.dumps(rows))


# -- the learner side (this process) -------------------------------------------------------------


def _serve_socket(listener: socket.socket, tensors: dict[str, torch.Tensor], stop: threading.Event) -> None:
    views = [memoryview(t.reshape(-1).view(torch.uint8).numpy().data) for t in tensors.values()]
    total = sum(len(v) for v in views)
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        with conn:
            conn.sendall(total.to_bytes(8, "little"))
            for view in views:
                conn.sendall(view)


async def learner_main(args: argparse.Namespace) -> list[dict[str, Any]]:
    from flowlane.api import learner_pb2, learner_pb2_grpc
    from flowlane.kit.grpc_common import bind_port, create_server, iter_weight_chunks

    tensors = model_like(args.mb)
    total = nbytes(tensors)
    token = "bench-token"

    class Servicer(learner_pb2_grpc.LearnerServicer):
        async def GetWeights(self, request: Any, context: Any) -> Any:
            for chunk in iter_weight_chunks(tensors, 1, request.chunk_bytes):
                yield chunk

        async def GetStatus(self, request: Any, context: Any) -> Any:
            return learner_pb2.LearnerStatus()

    server = create_server(token)
    learner_pb2_grpc.add_LearnerServicer_to_server(Servicer(), server)
    grpc_port = bind_port(server, "127.0.0.1", 0)
    await server.start()
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    thread = threading.Thread(target=_serve_socket, args=(listener, tensors, stop), daemon=True)
    thread.start()
    with tempfile.TemporaryDirectory(prefix="bench-weights-") as tmp:
        uri = (Path(tmp) / "checkpoints").as_uri()
        store = open_weights_store(uri)
        writes = []
        for version in range(1, args.repeats + 1):
            started = time.perf_counter()
            publish_version(store, 1 if version == 1 else version, tensors.items(), scratch=Path(tmp))
            writes.append(time.perf_counter() - started)
        # The worker fetches version 1; later writes measured the rate only (keep the first).
        store = open_weights_store(uri)
        command = [sys.executable, __file__, "--worker", "--grpc", f"127.0.0.1:{grpc_port}", "--token", token,
                   "--socket", str(listener.getsockname()[1]), "--store", uri, "--repeats", str(args.repeats),
                   "--mb", str(args.mb), "--chunk-mb", *map(str, args.chunk_mb)]
        if args.repeats > 2:  # the store kept only the newest two; publish version 1 again for the worker
            publish_version(store, 1, tensors.items(), scratch=Path(tmp))
        child = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE,
                                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        out, _ = await child.communicate()
    stop.set()
    thread.join()
    await server.stop(grace=None)
    if child.returncode:
        raise SystemExit(f"worker failed ({child.returncode})")
    measured: dict[str, list[list[float]]] = json.loads(out)
    largest_bucket = max(sum(tensors[n].numel() * 2 for n in b)
                         for b in layer_buckets({n: t.numel() * 2 for n, t in tensors.items()}, WEIGHT_BUCKET_BYTES))
    rows: list[dict[str, Any]] = []
    for path, rounds in measured.items():
        seconds = statistics.median(r[0] for r in rounds)
        rows.append({"path": path, "MB": rounds[0][1] / 1e6, "seconds": seconds,
                     "MB/s": rounds[0][1] / 1e6 / seconds,
                     "peak extra MiB": statistics.median(r[2] for r in rounds)})
    write_s = statistics.median(writes)
    rows.append({"path": "store write (learner, once per version)", "MB": total / 1e6, "seconds": write_s,
                 "MB/s": total / 1e6 / write_s, "peak extra MiB": None})
    for row in rows:
        bucketed = "bucket" in row["path"] or row["path"] == "store"
        row["largest bucket MiB"] = largest_bucket / 2**20 if bucketed else None
    return rows


def projection(rows: list[dict[str, Any]], grpc_path: str) -> list[dict[str, Any]]:
    rate = {row["path"]: row["MB/s"] * 1e6 for row in rows}
    r_grpc, r_read = rate[grpc_path], rate["store"]
    r_write = rate["store write (learner, once per version)"]
    out = []
    for model, params in MODELS.items():
        size = 2 * params
        for workers in WORKERS:
            out.append({"model (bf16)": f"{model} ({size / 1e9:.0f} GB)", "workers": workers,
                        "gRPC s = N*S/R_grpc": workers * size / r_grpc,
                        "store s = S/R_write + S/R_read": size / r_write + size / r_read,
                        "learner sends (gRPC)": f"{workers * size / 1e9:.0f} GB",
                        "learner sends (store)": f"{size / 1e9:.0f} GB"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="size of the synthetic bf16 model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-mb", type=int, nargs="+", default=[4], help="gRPC chunk sizes to compare")
    parser.add_argument("--only", choices=("transport", "engine"),
                        help="transport: the synthetic model's paths; engine: full vs LoRA into vLLM")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--grpc", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--socket", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return
    if args.engine_worker:
        engine_worker_main(args)
        return
    if args.only != "engine":
        transport(args)
    if args.only != "transport":
        if args.only is None:
            print()
        print_header("Weight sync: full weights vs LoRA into a vLLM engine",
                     notes=[f"the bundled smollm2-135m-instruct (float32), {args.repeats} syncs per row (median), "
                            "learner and worker in two processes on loopback, vLLM on CPU (eager)"])
        rows, engines = asyncio.run(engine_rows(args))
        print(markdown_table(rows, ["sync", "MB per sync", "of the model's bytes", "seconds per sync",
                                    "engine load s", "MB/s"], digits=3))
        print()
        print(markdown_table(engines, ["engine", "greedy tokens/s"], digits=1))


def transport(args: argparse.Namespace) -> None:
    print_header("Weight sync", notes=[f"synthetic bf16 model of {args.mb} MB, {args.repeats} interleaved "
                                       "rounds (median), learner and worker in two processes on loopback"])
    rows = asyncio.run(learner_main(args))
    socket_rate = next(r["MB/s"] for r in rows if r["path"] == "socket")
    whole_rate = next(r["MB/s"] for r in rows if r["path"] == "socket, into one new buffer")
    for row in rows:
        row["of socket"] = f"{row['MB/s'] / socket_rate:.0%}" if row["path"].startswith(("grpc", "socket")) else ""
        if row["path"].startswith("grpc-"):
            row["of socket, new buffer"] = f"{row['MB/s'] / whole_rate:.0%}"
    print(markdown_table(rows, ["path", "MB", "seconds", "MB/s", "of socket", "of socket, new buffer", "peak extra MiB",
                                "largest bucket MiB"], digits=1))
    print()
    best_grpc = "grpc, buckets into weights (worker)"
    print(f"Projection from the measured rates ({best_grpc} for gRPC):\n")
    print(markdown_table(projection(rows, best_grpc), ["model (bf16)", "workers", "gRPC s = N*S/R_grpc",
                                                      "store s = S/R_write + S/R_read", "learner sends (gRPC)",
                                                      "learner sends (store)"], digits=0))


if __name__ == "__main__":
    main()
