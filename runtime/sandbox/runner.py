"""Run untrusted Python (code an LLM wrote) without trusting it.

The executor's LLM writes Python for the ``python`` tool; that code can loop forever, allocate
all memory, fork-bomb, print gigabytes, open sockets or overwrite files. The caller (a rollout
worker, the sandbox server) must survive all of it and get back a short, classified result. No
single mechanism does that everywhere, so the sandbox stacks independent layers, each enforced by
the kernel or the interpreter, and reports which ones were in force for every run:

``rlimits`` (always, mandatory)
    RLIMIT_CPU (SIGXCPU at the limit, reported as ``cpu_limit``; SIGKILL one second later, for
    code that ignores SIGXCPU, reported as ``killed``), RLIMIT_AS (allocation fails with
    MemoryError), RLIMIT_NPROC (fork/thread creation fails), RLIMIT_FSIZE (writes past the size
    fail with EFBIG; CPython ignores SIGXFSZ), RLIMIT_NOFILE, and RLIMIT_CORE = 0.
``unprivileged_uid`` (when the caller is root; mandatory then)
    RLIMIT_NPROC does not bind root, and root writes anywhere. The child therefore drops to a
    fresh per-run uid/gid (no supplementary groups, all capabilities gone). Being unique per run
    it also makes RLIMIT_NPROC count only this run's processes, keeps concurrent runs from
    signalling each other, and lets the caller kill every leftover process of the run at once
    (``kill -KILL -1`` from a helper running as that uid, atomic against forks) when the tracker
    could not report a complete sweep (killed at a deadline before it finished).
``no_new_privs``
    PR_SET_NO_NEW_PRIVS: nothing the code runs can gain privileges through setuid binaries.
``network_namespace`` (when permitted: root, or CAP_SYS_ADMIN)
    unshare(CLONE_NEWNET) puts the child in an empty network namespace: no interface is up, not
    even loopback, so nothing can be reached whatever the code does.
``private_tmp`` (when permitted)
    unshare(CLONE_NEWNS) and fresh size-capped tmpfs mounts over /tmp, /var/tmp and /dev/shm (the
    world-writable places an unprivileged uid could still write to); the scratch directory is
    bind-mounted back at its own path. Whatever slips past the audit hook into those directories
    vanishes with the run. The same private mount namespace makes the Python installation
    readable when it sits in a directory the uid cannot enter (pyenv under a 0700 /root, as on
    the development machine): that directory is covered by an empty tmpfs and only the import
    paths are bind-mounted back, so the code sees its interpreter and nothing else there.
``audit_hook``
    A ``sys.addaudithook`` hook, installed by the bootstrap before the user code runs, refuses
    socket creation and use, subprocess / os.system / exec / spawn, foreign function calls through
    ctypes, and any write, rename, delete or chmod outside the scratch directory. A refusal raises
    ``PermissionError`` (so libraries that probe for features degrade gracefully); uncaught, it
    ends the run as ``blocked``. ``os.fork`` stays allowed (RLIMIT_NPROC bounds it, and a forked
    child keeps every layer). Audit hooks are not a security boundary on their own (Python code
    can tamper with interpreter state), which is why the kernel layers exist.
``seccomp``, ``landlock`` (no privileges needed; mandatory)
    The system calls and the files the code may use: ``runtime/sandbox/seccomp.py`` and
    ``runtime/sandbox/landlock.py`` say what each stops.
``process_tracking`` (mandatory)
    A tracker process (a child subreaper) between the caller and the run inherits every orphan of
    the run, ``setsid`` daemons included, and kills them all when the run ends.
``non_dumpable_caller`` (mandatory)
    The calling process is non-dumpable (``make_non_dumpable``): code of the same uid cannot read
    its ``/proc`` files or memory.

A wall-clock deadline kills the whole process group and then every process of the run's uid;
stdout and stderr are read concurrently and kept only up to ``max_output_bytes`` each (the rest
is drained and dropped, never buffered); the scratch directory is the working directory, HOME
and TMPDIR, and it is deleted afterwards. The environment is not inherited (no credentials leak).

What is enforced where. On the development and CI machines (Linux 6.x, running as root with
full capabilities, Python 3.11) every layer is in force, and ``tests/test_sandbox.py`` checks
each on its own: the first test fails loudly if any layer cannot be applied, so a machine that
silently lost one does not pass. In a Kubernetes pod running as a non-root user without
CAP_SYS_ADMIN, ``network_namespace`` and ``private_tmp`` cannot be applied (the pod's
NetworkPolicy and a read-only root filesystem take their place), there is no uid drop (the pod
user is already unprivileged) and RLIMIT_NPROC counts all of that user's processes; the rest
still holds, and seccomp, Landlock and the tracker cover what the uid drop covers as root
(``tests/test_sandbox.py`` runs the escape suite as uid 10001 through ``setpriv``).
``SandboxResult.isolation`` says which layers a run actually had, and
``Isolation(strict=True)`` refuses to run code without all requested layers.

Known gaps, covered by the kernel layers rather than the hook: ``os.open(..., dir_fd=...)``
relative to a directory opened for reading is not resolved by the hook (the open event carries
no dir_fd); C extensions that write files without going through Python's audited calls.

The child is ``runtime/sandbox/child.py``, a stdlib-only bootstrap started with ``python -I -S
-B`` (every import there is paid per execution): it applies the layers in order (namespaces and
mounts need root, so they come before the uid drop; the audit hook comes last, once nothing
privileged is left to do), reports the layers on a private pipe, closes it, and only then executes
the user code. This side does the costly parts once per process: the seccomp program (built with
libseccomp, exported as BPF) and the import path (site-packages, so the child can skip ``site``).

Where each part lives: this module runs a program (``run_python``, ``LocalCodeRunner``); ``layers``
names the layers and the request (``Isolation``), ``limits`` the limits, ``result`` what a run
returns and how its end is classified, ``process_control`` the per-run uid and the killing of
what a run leaves, ``child_launch`` what the child is prepared with and what it reports back.
"""

from __future__ import annotations

import asyncio
import contextlib
import marshal
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from flowlane.runtime.sandbox import child
from flowlane.runtime.sandbox.child_launch import read_control, refresh_child_bytecode, seccomp_settings, site_paths
from flowlane.runtime.sandbox.layers import Isolation, IsolationLayer, is_non_dumpable
from flowlane.runtime.sandbox.limits import SandboxLimits
from flowlane.runtime.sandbox.process_control import UidLease, exit_of, kill_all_of_uid, kill_group, stop_tracker
from flowlane.runtime.sandbox.result import SandboxErrorKind, SandboxResult, classify_exit

__all__ = ["CodeRunner", "LocalCodeRunner", "probe_isolation", "run_python"]


@runtime_checkable
class CodeRunner(Protocol):
    """Anything that runs code under limits: the local sandbox here, a gRPC sandbox client later."""

    async def run(self, code: str, limits: SandboxLimits | None = None) -> SandboxResult: ...


class LocalCodeRunner:
    """Runs code in local sandbox subprocesses, at most ``max_concurrency`` at a time."""

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        *,
        scratch_root: Path | None = None,
        isolation: Isolation | None = None,
        max_concurrency: int = 4,
    ) -> None:
        self.limits = limits or SandboxLimits()
        self.scratch_root = scratch_root
        self.isolation = isolation or Isolation()
        self._slots = asyncio.Semaphore(max_concurrency)

    async def run(self, code: str, limits: SandboxLimits | None = None) -> SandboxResult:
        async with self._slots:
            return await run_python(
                code, limits or self.limits, scratch_root=self.scratch_root, isolation=self.isolation
            )



_MAX_CODE_BYTES = 1024 * 1024
_READ_CHUNK = 64 * 1024


async def _read_capped(stream: asyncio.StreamReader | None, cap: int) -> tuple[bytes, bool]:
    """Read a stream to EOF, keeping at most ``cap`` bytes; the rest is read and dropped."""
    if stream is None:
        return b"", False
    kept = bytearray()
    overflow = False
    while chunk := await stream.read(_READ_CHUNK):
        room = cap - len(kept)
        if len(chunk) > room:
            overflow = True
            kept += chunk[: max(room, 0)]
        else:
            kept += chunk
    return bytes(kept), overflow



async def run_python(
    code: str,
    limits: SandboxLimits = SandboxLimits(),
    scratch_root: Path | None = None,
    *,
    isolation: Isolation = Isolation(),
) -> SandboxResult:
    """Run ``code`` as a Python program in a fresh sandboxed subprocess and classify how it ended.

    Never raises for anything the code does; only for a broken host (no /proc, cannot spawn).
    """
    started = time.monotonic()
    encoded = code.encode("utf-8", errors="replace")
    if len(encoded) > _MAX_CODE_BYTES:
        return SandboxResult(
            "", "", None, False, SandboxErrorKind.ERROR, f"error: code is over {_MAX_CODE_BYTES} bytes"
        )
    if isolation.strict and not is_non_dumpable():
        return SandboxResult("", "", None, False, SandboxErrorKind.ERROR,
                             "error: strict isolation: unavailable layers: non_dumpable_caller (the calling "
                             "process is dumpable: call make_non_dumpable() first)")
    as_root = os.geteuid() == 0
    lease = UidLease() if as_root else None
    uid = lease.uid if lease else None
    scratch = Path(tempfile.mkdtemp(prefix="flowlane-sbx-", dir=scratch_root)).resolve()
    control_r, control_w = os.pipe()
    os.set_blocking(control_r, False)
    readers: asyncio.Future[Any] | None = None
    try:
        if uid is not None:
            os.chown(scratch, uid, uid)
        config = {
            "scratch": str(scratch),
            "uid": uid,
            "control_fd": control_w,
            "site_paths": site_paths(),
            "cpu_time_s": math.ceil(limits.cpu_time_s),
            "memory_bytes": limits.memory_bytes,
            "max_processes": limits.max_processes,
            "max_file_bytes": limits.max_file_bytes,
            "max_open_files": limits.max_open_files,
            "network_namespace": isolation.network_namespace,
            "private_tmp": isolation.private_tmp,
            "audit_hook": isolation.audit_hook,
            "no_new_privs": isolation.no_new_privs,
            "seccomp": isolation.seccomp,
            "landlock": isolation.landlock,
            "strict": isolation.strict,
            **(seccomp_settings() if isolation.seccomp else {"seccomp_template": None}),
            "code": encoded,
        }
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(scratch),
            "TMPDIR": str(scratch),
            "MPLCONFIGDIR": str(scratch),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            # One thread per numeric library: threads count against max_processes.
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "NUMBA_NUM_THREADS": "1",
        }
        refresh_child_bytecode()
        proc = await asyncio.create_subprocess_exec(
            *child.command(sys.executable),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=str(scratch),
            env=env,
            start_new_session=True,
            pass_fds=(control_w,),
        )
        os.close(control_w)
        control_w = -1
        exited = exit_of(proc.pid)
        readers = gathered = asyncio.gather(
            _read_capped(proc.stdout, limits.max_output_bytes),
            _read_capped(proc.stderr, limits.max_output_bytes),
        )
        timed_out = False
        try:
            async with asyncio.timeout(limits.wall_time_s):
                if proc.stdin is not None:
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        proc.stdin.write(marshal.dumps(config))
                        await proc.stdin.drain()
                    proc.stdin.close()
                await exited
        except TimeoutError:
            timed_out = True
        finally:
            # The tracker first (it kills every process of the run, wherever it moved), then the
            # group, then, unless the tracker reported its sweep complete, every process of the
            # run's uid (a tracker killed before its sweep leaves orphans of the run to init).
            await stop_tracker(proc) if timed_out else kill_group(proc.pid)
            report = read_control(control_r)
            leftovers = report.swept or 0
            if uid is not None and report.swept is None:
                leftovers += await kill_all_of_uid(uid)
            exited.cancel()
            with contextlib.suppress(TimeoutError):  # a pipe held by a process we could not kill
                await asyncio.wait_for(proc.wait(), timeout=5)
        try:
            (out, out_over), (err, err_over) = await asyncio.wait_for(gathered, timeout=5)
        except TimeoutError:  # a pipe held open by a process we could not kill (non-root)
            (out, out_over), (err, err_over) = (b"", True), (b"", True)
        layers, missing = report.layers, report.missing
        if layers and is_non_dumpable():
            layers += (IsolationLayer.NON_DUMPABLE_CALLER,)
        stdout = out.decode("utf-8", errors="replace")
        stderr = err.decode("utf-8", errors="replace")
        kind, message = classify_exit(proc.returncode, timed_out, limits, stderr)
        return SandboxResult(
            stdout=stdout,
            stderr=stderr,
            exit_code=proc.returncode,
            ok=kind is None,
            error_kind=kind,
            message=message,
            truncated=out_over or err_over,
            duration_s=time.monotonic() - started,
            isolation=layers,
            sandbox_uid=uid,
            details={"leftover_processes_killed": leftovers, **({"missing_layers": missing} if missing else {})},
        )
    finally:
        if readers is not None and not readers.done():
            readers.cancel()
            with contextlib.suppress(BaseException):
                await readers
        os.close(control_r)
        if control_w >= 0:
            os.close(control_w)
        shutil.rmtree(scratch, ignore_errors=True)
        if lease:
            lease.release()


async def probe_isolation(isolation: Isolation = Isolation()) -> tuple[IsolationLayer, ...]:
    """The layers a trivial run gets on this machine (what every run here will have)."""
    result = await run_python("pass", SandboxLimits(wall_time_s=30), isolation=isolation)
    if not result.ok:
        raise RuntimeError(f"sandbox probe failed: {result.message}\n{result.stderr}")
    return result.isolation
