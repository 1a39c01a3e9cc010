"""The caller's side of the child bootstrap: what it prepares once per process, what it reads back.

The child (``child.py``) is stdlib-only and pays every import on every run, so the costly parts are
done here once: fresh bytecode for the child's modules, the import path, the seccomp program. After
the run, the child's report (layers in force, layers missing, the tracker's sweep) is read off the
control pipe.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import py_compile
import site
from dataclasses import dataclass, field
from typing import Any

from flowlane.runtime.sandbox import child, landlock
from flowlane.runtime.sandbox.layers import IsolationLayer


@functools.cache
def refresh_child_bytecode() -> None:
    """Write the child modules' bytecode caches where they are stale, once per process.

    The child runs with -B and would otherwise compile both modules on every execution wherever
    the caller runs with PYTHONDONTWRITEBYTECODE (the images have install-time caches; a source
    tree being edited does not). A tree that cannot be written keeps the cost, nothing else."""
    for module in (child, landlock):
        source, cached = module.__file__ or "", importlib.util.cache_from_source(module.__file__ or "")
        with contextlib.suppress(OSError):
            if os.stat(cached).st_mtime >= os.stat(source).st_mtime:
                continue
        with contextlib.suppress(OSError, py_compile.PyCompileError):
            py_compile.compile(source, cfile=cached, doraise=True)


@functools.cache
def site_paths() -> list[str]:
    """The site-packages directories the code imports from: what ``site`` would add for this
    interpreter, found once here so that the child can skip ``site`` (``.pth`` files are not run)."""
    return [p for p in site.getsitepackages() if os.path.isdir(p)]


def seccomp_settings() -> dict[str, Any]:
    """The seccomp program template for the child, or why there is none."""
    try:
        from flowlane.runtime.sandbox import seccomp

        return {"seccomp_template": seccomp.program_template(), "seccomp_unavailable": ""}
    except (ImportError, OSError) as exc:
        return {"seccomp_template": None, "seccomp_unavailable": f"libseccomp: {exc}"}


@dataclass
class ChildReport:
    """What the child wrote on its control pipe (format: ``child``'s docstring)."""

    layers: tuple[IsolationLayer, ...] = ()  # in force for the run
    missing: list[str] = field(default_factory=list)  # requested but not applied, with the reason
    swept: int | None = None  # processes the tracker killed after the run; None: no complete sweep


def read_control(fd: int) -> ChildReport:
    """Whatever is on the control pipe by now (non-blocking); unknown lines are ignored."""
    data = b""
    with contextlib.suppress(BlockingIOError, OSError):
        while chunk := os.read(fd, 4096):
            data += chunk
    report = ChildReport()
    known = {layer.value for layer in IsolationLayer}
    for line in data.decode("utf-8", errors="replace").splitlines():
        tag, _, value = line.partition(" ")
        if tag == "layer" and value in known:
            report.layers += (IsolationLayer(value),)
        elif tag == "missing":
            report.missing.append(value)
        elif tag == "swept" and value.isdigit():
            report.swept = int(value)
    return report
