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
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import importlib.util
import marshal
import math
import os
import py_compile
import random
import shutil
import signal
import site
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from flowlane.api.errors import ConfigError
from flowlane.runtime.sandbox import child, landlock
from flowlane.runtime.sandbox.child import EXIT_BLOCKED, EXIT_FILE, EXIT_MEMORY, EXIT_PROCESS, EXIT_SETUP

__all__ = [
    "MANDATORY_LAYERS",
    "CodeRunner",
    "Isolation",
    "IsolationLayer",
    "LocalCodeRunner",
    "SandboxErrorKind",
    "SandboxLimits",
    "SandboxResult",
    "make_non_dumpable",
    "missing_mandatory_layers",
    "probe_isolation",
    "run_python",
]

MiB = 1024 * 1024


class SandboxErrorKind(StrEnum):
    """Why a run did not end normally."""

    TIMEOUT = "timeout"  # wall-clock limit: the caller killed the process group
    CPU_LIMIT = "cpu_limit"  # RLIMIT_CPU: SIGXCPU
    MEMORY_LIMIT = "memory_limit"  # RLIMIT_AS: an uncaught MemoryError
    PROCESS_LIMIT = "process_limit"  # RLIMIT_NPROC: fork or thread creation failed, uncaught
    FILE_LIMIT = "file_limit"  # RLIMIT_FSIZE: a write failed with EFBIG, uncaught
    KILLED = "killed"  # ended by another signal (SIGKILL, SIGSEGV, ...)
    BLOCKED = "blocked"  # the audit hook refused an operation and the code did not handle it
    ERROR = "error"  # any other non-zero exit (an exception in the code, a bad setup)


class IsolationLayer(StrEnum):
    """The independent protections a run can have (see the module docstring)."""

    RLIMITS = "rlimits"
    UNPRIVILEGED_UID = "unprivileged_uid"
    NO_NEW_PRIVS = "no_new_privs"
    NETWORK_NAMESPACE = "network_namespace"
    PRIVATE_TMP = "private_tmp"
    AUDIT_HOOK = "audit_hook"
    SECCOMP = "seccomp"
    LANDLOCK = "landlock"
    PROCESS_TRACKING = "process_tracking"
    NON_DUMPABLE_CALLER = "non_dumpable_caller"


#: Layers a run that executes model code for a FlowRun or FlowService must have, wherever it runs
#: (they need no privileges); ``unprivileged_uid`` joins them when the caller is root. The sandbox
#: server refuses to start without them unless told otherwise (``allowWeakIsolation``).
MANDATORY_LAYERS = frozenset({
    IsolationLayer.RLIMITS, IsolationLayer.NO_NEW_PRIVS, IsolationLayer.SECCOMP, IsolationLayer.LANDLOCK,
    IsolationLayer.PROCESS_TRACKING, IsolationLayer.NON_DUMPABLE_CALLER,
})


def missing_mandatory_layers(layers: tuple[IsolationLayer, ...], *, as_root: bool | None = None) -> list[str]:
    """The mandatory layers not in ``layers``, by name, in a stable order."""
    needed = set(MANDATORY_LAYERS)
    if os.geteuid() == 0 if as_root is None else as_root:
        needed.add(IsolationLayer.UNPRIVILEGED_UID)
    return sorted(layer.value for layer in needed - set(layers))


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one run. Defaults suit LLM-written snippets (math, parsing, small sims)."""

    cpu_time_s: float = 5.0  # CPU seconds (RLIMIT_CPU, rounded up to whole seconds)
    wall_time_s: float = 10.0  # wall-clock seconds, including interpreter start-up
    memory_bytes: int = 1024 * MiB  # address space (RLIMIT_AS); numpy + sympy need about 200 MiB
    max_processes: int = 32  # processes and threads of the run's uid (RLIMIT_NPROC)
    max_file_bytes: int = 16 * MiB  # largest file the code may write (RLIMIT_FSIZE)
    max_output_bytes: int = 64 * 1024  # kept per stream (stdout, stderr); the rest is dropped
    max_open_files: int = 256  # RLIMIT_NOFILE

    def __post_init__(self) -> None:
        for name in ("cpu_time_s", "wall_time_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"sandbox limits: {name} must be > 0, got {getattr(self, name)}")
        for name in ("memory_bytes", "max_processes", "max_file_bytes", "max_output_bytes", "max_open_files"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sandbox limits: {name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Isolation:
    """Which optional layers to apply. Rlimits, and the uid drop when running as root, always apply.

    Switching layers off exists so tests can show each layer holding on its own.
    """

    network_namespace: bool = True
    private_tmp: bool = True
    audit_hook: bool = True
    no_new_privs: bool = True
    seccomp: bool = True
    landlock: bool = True
    #: Refuse to run (kind ``error``) when a requested layer cannot be applied on this machine.
    strict: bool = False


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None  # negative: killed by that signal; None: never started
    ok: bool
    error_kind: SandboxErrorKind | None = None
    message: str = ""  # one line for humans and LLMs ("timeout: wall-clock limit of 2s")
    truncated: bool = False  # stdout or stderr went over max_output_bytes
    duration_s: float = 0.0
    isolation: tuple[IsolationLayer, ...] = ()  # layers that were in force for this run
    sandbox_uid: int | None = None  # the per-run uid when the caller was root
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["error_kind"] = self.error_kind.value if self.error_kind else None
        data["isolation"] = [layer.value for layer in self.isolation]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SandboxResult:
        data = dict(data)
        data["error_kind"] = SandboxErrorKind(data["error_kind"]) if data.get("error_kind") else None
        data["isolation"] = tuple(IsolationLayer(v) for v in data.get("isolation", ()))
        return cls(**data)


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


# --------------------------------------------------------------------------------------------
# The caller side.

# How the bootstrap classifies an uncaught exception (user code can fake these exit codes, which
# only misreports its own failure).
_EXIT_KINDS = {
    EXIT_MEMORY: SandboxErrorKind.MEMORY_LIMIT,
    EXIT_BLOCKED: SandboxErrorKind.BLOCKED,
    EXIT_PROCESS: SandboxErrorKind.PROCESS_LIMIT,
    EXIT_FILE: SandboxErrorKind.FILE_LIMIT,
}

_MAX_CODE_BYTES = 1024 * 1024
_READ_CHUNK = 64 * 1024
# Per-run uids come from this range (inside 16 bits so that user-namespaced containers, which
# usually map only 0..65535, can still switch to them). Lock files keep concurrent callers, in
# this process or others, from sharing one.
_UID_RANGE = range(40000, 60000)
_UID_LOCK_DIR = Path(tempfile.gettempdir()) / "flowlane-sandbox-uids"
_UID_PICKER = random.SystemRandom()  # never touches (or depends on) the seeded global RNG


class _UidLease:
    """An exclusive per-run uid, held through a lock file for the duration of the run."""

    def __init__(self) -> None:
        _UID_LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
        for _ in range(200):
            uid = _UID_PICKER.choice(_UID_RANGE)
            fd = os.open(_UID_LOCK_DIR / f"{uid}.lock", os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.uid, self._fd = uid, fd
            return
        raise RuntimeError(f"sandbox: no free uid in {_UID_RANGE} after 200 tries")

    def release(self) -> None:
        os.close(self._fd)  # closing drops the flock


def _running_pids_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is ``uid``."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("Uid", "").split()[:1] == [str(uid)] and not fields.get("State", "").strip().startswith(
            "Z"
        ):
            pids.append(int(entry.name))
    return pids


async def _kill_all_of_uid(uid: int) -> int:
    """Kill every process of ``uid``; returns how many were alive at the first look.

    ``kill -KILL -1`` sent by a helper shell running as that uid reaches all of its processes in one
    atomic sweep (no pid-reuse race, no fork race); a few rounds cover processes that were still
    being created.
    """
    first = len(_running_pids_of_uid(uid))
    alive = first
    for _ in range(20):
        if not alive:
            break
        helper = await asyncio.create_subprocess_exec(
            "/bin/sh",  # any uid can run it (the interpreter may sit in a directory it cannot read)
            "-c",
            "kill -KILL -1 2>/dev/null; exit 0",
            user=uid,
            group=uid,
            extra_groups=[],
            env={},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await helper.wait()
        await asyncio.sleep(0.01)
        alive = len(_running_pids_of_uid(uid))
    return first


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


def _exit_of(pid: int) -> asyncio.Future[None]:
    """A future that completes when ``pid`` exits.

    ``Process.wait()`` on Python 3.11 also waits for the stdout/stderr pipes to close, which a
    background grandchild can hold open; a pidfd fires on the exit of the process itself.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:  # already gone
        done.set_result(None)
        return done

    def on_exit() -> None:
        if not done.done():
            done.set_result(None)

    def cleanup(_: asyncio.Future[None]) -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)

    loop.add_reader(pidfd, on_exit)
    done.add_done_callback(cleanup)
    return done


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def make_non_dumpable() -> None:
    """PR_SET_DUMPABLE 0 for this process: its ``/proc/<pid>`` files (environ, mem, maps, fd) then
    belong to root, and ptrace and process_vm_* refuse it, even for processes of its own uid.

    The sandbox server calls this first thing: as the pod's uid, code it runs shares that uid.
    """
    child.prctl(child.PR_SET_DUMPABLE, 0)


def _is_non_dumpable() -> bool:
    return child.prctl(child.PR_GET_DUMPABLE) == 0


@functools.cache
def _refresh_child_bytecode() -> None:
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
def _site_paths() -> list[str]:
    """The site-packages directories the code imports from: what ``site`` would add for this
    interpreter, found once here so that the child can skip ``site`` (``.pth`` files are not run)."""
    return [p for p in site.getsitepackages() if os.path.isdir(p)]


def _seccomp_settings() -> dict[str, Any]:
    """The seccomp program template for the child, or why there is none."""
    try:
        from flowlane.runtime.sandbox import seccomp

        return {"seccomp_template": seccomp.program_template(), "seccomp_unavailable": ""}
    except (ImportError, OSError) as exc:
        return {"seccomp_template": None, "seccomp_unavailable": f"libseccomp: {exc}"}


async def _stop_tracker(proc: asyncio.subprocess.Process) -> None:
    """Ask the run's tracker to kill every process of the run (SIGTERM), then kill its group."""
    exited = _exit_of(proc.pid)  # a fresh one: the deadline cancelled the first
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(exited, timeout=2)
    except TimeoutError:
        pass
    finally:
        exited.cancel()
    _kill_group(proc.pid)


def _classify(
    returncode: int | None, timed_out: bool, limits: SandboxLimits, stderr: str
) -> tuple[SandboxErrorKind | None, str]:
    if timed_out:
        return SandboxErrorKind.TIMEOUT, f"timeout: wall-clock limit of {limits.wall_time_s:g}s"
    if returncode == 0:
        return None, ""
    if returncode is None:
        return SandboxErrorKind.ERROR, "error: the process did not start"
    if returncode == -signal.SIGXCPU:
        return SandboxErrorKind.CPU_LIMIT, f"cpu_limit: CPU-time limit of {math.ceil(limits.cpu_time_s)}s"
    if returncode == -signal.SIGXFSZ:
        return SandboxErrorKind.FILE_LIMIT, f"file_limit: file-size limit of {limits.max_file_bytes} bytes"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return SandboxErrorKind.KILLED, f"killed: by signal {name}"
    kind = _EXIT_KINDS.get(returncode)
    if kind is SandboxErrorKind.MEMORY_LIMIT:
        return kind, f"memory_limit: memory limit of {limits.memory_bytes // MiB} MiB"
    if kind is SandboxErrorKind.PROCESS_LIMIT:
        return kind, f"process_limit: process/thread limit of {limits.max_processes}"
    if kind is SandboxErrorKind.FILE_LIMIT:
        return kind, f"file_limit: file-size limit of {limits.max_file_bytes} bytes"
    last_line = next((ln for ln in reversed(stderr.strip().splitlines()) if ln.strip()), "")
    if kind is SandboxErrorKind.BLOCKED:
        return kind, f"blocked: {last_line}" if last_line else "blocked"
    if returncode == EXIT_SETUP:
        return SandboxErrorKind.ERROR, f"error: sandbox setup failed: {last_line}"
    return SandboxErrorKind.ERROR, f"error: exit code {returncode}" + (f": {last_line}" if last_line else "")


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
    if isolation.strict and not _is_non_dumpable():
        return SandboxResult("", "", None, False, SandboxErrorKind.ERROR,
                             "error: strict isolation: unavailable layers: non_dumpable_caller (the calling "
                             "process is dumpable: call make_non_dumpable() first)")
    as_root = os.geteuid() == 0
    lease = _UidLease() if as_root else None
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
            "site_paths": _site_paths(),
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
            **(_seccomp_settings() if isolation.seccomp else {"seccomp_template": None}),
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
        _refresh_child_bytecode()
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
        exited = _exit_of(proc.pid)
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
            await _stop_tracker(proc) if timed_out else _kill_group(proc.pid)
            report = _read_control(control_r)
            leftovers = report.swept or 0
            if uid is not None and report.swept is None:
                leftovers += await _kill_all_of_uid(uid)
            exited.cancel()
            with contextlib.suppress(TimeoutError):  # a pipe held by a process we could not kill
                await asyncio.wait_for(proc.wait(), timeout=5)
        try:
            (out, out_over), (err, err_over) = await asyncio.wait_for(gathered, timeout=5)
        except TimeoutError:  # a pipe held open by a process we could not kill (non-root)
            (out, out_over), (err, err_over) = (b"", True), (b"", True)
        layers, missing = report.layers, report.missing
        if layers and _is_non_dumpable():
            layers += (IsolationLayer.NON_DUMPABLE_CALLER,)
        stdout = out.decode("utf-8", errors="replace")
        stderr = err.decode("utf-8", errors="replace")
        kind, message = _classify(proc.returncode, timed_out, limits, stderr)
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


@dataclass
class _ChildReport:
    """What the child wrote on its control pipe (format: ``child``'s docstring)."""

    layers: tuple[IsolationLayer, ...] = ()  # in force for the run
    missing: list[str] = field(default_factory=list)  # requested but not applied, with the reason
    swept: int | None = None  # processes the tracker killed after the run; None: no complete sweep


def _read_control(fd: int) -> _ChildReport:
    """Whatever is on the control pipe by now (non-blocking); unknown lines are ignored."""
    data = b""
    with contextlib.suppress(BlockingIOError, OSError):
        while chunk := os.read(fd, 4096):
            data += chunk
    report = _ChildReport()
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


async def probe_isolation(isolation: Isolation = Isolation()) -> tuple[IsolationLayer, ...]:
    """The layers a trivial run gets on this machine (what every run here will have)."""
    result = await run_python("pass", SandboxLimits(wall_time_s=30), isolation=isolation)
    if not result.ok:
        raise RuntimeError(f"sandbox probe failed: {result.message}\n{result.stderr}")
    return result.isolation
