"""Checkpoint save/load throughput: the S3 endpoint vs local disk, store vs raw transfer.

A SmolLM2-135M planner is ~540 MB of fp32 safetensors; the learner writes one every N steps and
rollout workers (or a resumed learner) read it back. This measures what the checkpoint store
costs on each backend for a checkpoint of that size (random tensors, same bytes everywhere):

- ``store save`` / ``store load``: :class:`CheckpointStore` ``save`` (sha256 of every byte,
  manifest last, pointer, retention) and ``download`` (sha256 verification, atomic rename).
- ``raw copy``: the same bytes moved with no hashing or manifest (``shutil.copyfile`` on disk;
  minio ``fput_object``/``fget_object`` on S3), the floor the store's overhead is measured against.

The S3 endpoint is moto's server on loopback (what CI has): a Python server, so its numbers are a
lower bound for a real MinIO, but the comparison store-vs-raw holds. MB is 10^6 bytes.

Run ``python bench/checkpoint_io.py [--size-mb 540] [--repeats 1]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from flowlane.kit.checkpoints import CheckpointStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures_services import MotoS3Server  # the same S3 endpoint the tests use

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # bench scripts run as files: see bench/common.py

MB = 1_000_000


def make_checkpoint(dest: Path, size_mb: int, seed: int = 0) -> Path:
    """A model-like directory: fp32 safetensors totalling ``size_mb`` plus a config."""
    dest.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    n_floats = size_mb * MB // 4
    shard = 16 * MB // 4  # 16 MB tensors, like a model's layers
    tensors = {
        f"layer.{i}.weight": rng.standard_normal(min(shard, n_floats - i * shard), dtype=np.float32)
        for i in range(-(-n_floats // shard))
    }
    save_file(tensors, str(dest / "model.safetensors"))
    (dest / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    return dest


def _timed(fn: Callable[[], Any], repeats: int, reset: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeats):
        reset()
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def _bench_store(store: CheckpointStore, src: Path, dest: Path, repeats: int) -> tuple[float, float]:
    steps = iter(range(1, repeats + 1))
    meta = {"model": {"architectures": ["LlamaForCausalLM"]}}
    save_s = _timed(lambda: store.save(next(steps), src, meta), repeats, lambda: None)
    ref = store.latest()
    assert ref is not None
    load_s = _timed(lambda: store.download(ref, dest), repeats, lambda: shutil.rmtree(dest, True))
    return save_s, load_s


def run(size_mb: int = 540, repeats: int = 1) -> list[dict[str, Any]]:
    """One row per (target, operation): seconds (best of ``repeats``) and MB/s."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="flowlane-bench-ckpt-") as tmp_name:
        tmp = Path(tmp_name)
        src = make_checkpoint(tmp / "src", size_mb)
        total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
        server = MotoS3Server(tmp)
        server.start()
        try:
            bucket = server.make_bucket("bench")
            s3 = {"endpoint": server.endpoint, "access_key": server.access_key, "secret_key": server.secret_key}
            targets = {
                "local disk": CheckpointStore.from_uri((tmp / "store").as_uri(), keep_last=1),
                "S3 (moto, loopback)": CheckpointStore.from_uri(f"s3://{bucket}/bench", keep_last=1, **s3),
            }
            for target, store in targets.items():
                save_s, load_s = _bench_store(store, src, tmp / "restored", repeats)
                rows.append(_row(target, "store save", total, save_s))
                rows.append(_row(target, "store load", total, load_s))

            raw_dir = tmp / "raw"
            raw_dir.mkdir()
            files = [p for p in src.rglob("*") if p.is_file()]

            def copy_files(from_dir: Path, to_dir: Path) -> None:
                to_dir.mkdir(exist_ok=True)
                for path in files:
                    shutil.copyfile(from_dir / path.name, to_dir / path.name)

            def reset_raw_back() -> None:
                shutil.rmtree(raw_dir / "back", True)

            copy_s = _timed(lambda: copy_files(src, raw_dir / "out"), repeats, lambda: None)
            back_s = _timed(lambda: copy_files(raw_dir / "out", raw_dir / "back"), repeats, reset_raw_back)
            rows.append(_row("local disk", "raw copy out", total, copy_s))
            rows.append(_row("local disk", "raw copy in", total, back_s))

            client = server.client()
            put_s = _timed(
                lambda: [client.fput_object(bucket, f"raw/{p.name}", str(p), part_size=64 << 20) for p in files],
                repeats,
                lambda: None,
            )
            get_s = _timed(
                lambda: [client.fget_object(bucket, f"raw/{p.name}", str(raw_dir / "get" / p.name)) for p in files],
                repeats,
                lambda: shutil.rmtree(raw_dir / "get", True),
            )
            rows.append(_row("S3 (moto, loopback)", "raw put", total, put_s))
            rows.append(_row("S3 (moto, loopback)", "raw get", total, get_s))
        finally:
            server.stop()
    return rows


def _row(target: str, operation: str, total_bytes: int, seconds: float) -> dict[str, Any]:
    return {
        "target": target,
        "operation": operation,
        "size_mb": round(total_bytes / MB, 1),
        "seconds": round(seconds, 2),
        "mb_per_s": round(total_bytes / MB / seconds, 1),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    headers = ["target", "operation", "size_mb", "seconds", "mb_per_s"]
    widths = {h: max(len(h), *(len(str(r[h])) for r in rows)) for h in headers}
    lines = [" | ".join(h.ljust(widths[h]) for h in headers), "-|-".join("-" * widths[h] for h in headers)]
    lines += [" | ".join(str(r[h]).ljust(widths[h]) for h in headers) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=int, default=540, help="checkpoint size (default: a 135M fp32 model)")
    parser.add_argument("--repeats", type=int, default=1, help="report the best of this many runs")
    args = parser.parse_args(argv)
    common.print_header("flowlane checkpoint I/O benchmark", [f"{args.size_mb} MB, best of {args.repeats}"])
    print(format_table(run(args.size_mb, args.repeats)))


if __name__ == "__main__":
    main()
