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
    (``kill -KILL -1`` from a helper running as that uid, atomic against forks).
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
    can tamper with interpreter state), which is why the kernel layers above exist.

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
still holds. That path is not exercised here (on this machine the interpreter is not readable by
a non-root user at all). ``SandboxResult.isolation`` says which layers a run actually had, and
``Isolation(strict=True)`` refuses to run code without all requested layers.

Known gaps, covered by the kernel layers rather than the hook: ``os.open(..., dir_fd=...)``
relative to a directory opened for reading is not resolved by the hook (the open event carries
no dir_fd); C extensions that write files without going through Python's audited calls.

The child is this file run as a script (``python -I -B sandbox.py CONFIG``): the bootstrap at the
bottom applies the layers in order (namespaces and mounts need root, so they come before the uid
drop; the audit hook comes last, once nothing privileged is left to do), reports the layers on a
private pipe, closes it, and only then executes the user code.
"""

from __future__ import annotations

import _thread
import asyncio
import builtins
import contextlib
import ctypes
import errno
import fcntl
import io
import json
import linecache
import math
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
import types
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from flowlane.api.errors import ConfigError

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

# Exit codes the bootstrap uses to classify an uncaught exception (user code can fake them, which
# only misreports its own failure).
_EXIT_MEMORY = 102
_EXIT_BLOCKED = 103
_EXIT_PROCESS = 104
_EXIT_FILE = 105
_EXIT_SETUP = 106
_EXIT_KINDS = {
    _EXIT_MEMORY: SandboxErrorKind.MEMORY_LIMIT,
    _EXIT_BLOCKED: SandboxErrorKind.BLOCKED,
    _EXIT_PROCESS: SandboxErrorKind.PROCESS_LIMIT,
    _EXIT_FILE: SandboxErrorKind.FILE_LIMIT,
}

_MAX_CODE_BYTES = 1024 * 1024
_READ_CHUNK = 64 * 1024
# Per-run uids come from this range (inside 16 bits so that user-namespaced containers, which
# usually map only 0..65535, can still switch to them). Lock files keep concurrent callers, in
# this process or others, from sharing one.
_UID_RANGE = range(40000, 60000)
_UID_LOCK_DIR = Path(tempfile.gettempdir()) / "flowlane-sandbox-uids"
_UID_PICKER = random.SystemRandom()  # never touches (or depends on) the seeded global RNG
_PRIVATE_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
_PRIVATE_TMP_SIZE = "16m"


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


_PR_GET_DUMPABLE = 3
_PR_SET_DUMPABLE = 4


def make_non_dumpable() -> None:
    """PR_SET_DUMPABLE 0 for this process: its ``/proc/<pid>`` files (environ, mem, maps, fd) then
    belong to root, and ptrace and process_vm_* refuse it, even for processes of its own uid.

    The sandbox server calls this first thing: as the pod's uid, code it runs shares that uid.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    _libc_call(libc, "prctl", _PR_SET_DUMPABLE, 0, 0, 0, 0)


def _is_non_dumpable() -> bool:
    return int(ctypes.CDLL(None).prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0)) == 0


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
    if returncode == _EXIT_SETUP:
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
            "cpu_time_s": limits.cpu_time_s,
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
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            "-B",
            str(Path(__file__).resolve()),
            json.dumps(config),
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
                        proc.stdin.write(encoded)
                        await proc.stdin.drain()
                    proc.stdin.close()
                await exited
        except TimeoutError:
            timed_out = True
        finally:
            # The tracker first (it kills every process of the run, wherever it moved), then the
            # group, then everything the run's uid still has.
            await _stop_tracker(proc) if timed_out else _kill_group(proc.pid)
            leftovers = await _kill_all_of_uid(uid) if uid is not None else 0
            exited.cancel()
            with contextlib.suppress(TimeoutError):  # a pipe held by a process we could not kill
                await asyncio.wait_for(proc.wait(), timeout=5)
        try:
            (out, out_over), (err, err_over) = await asyncio.wait_for(gathered, timeout=5)
        except TimeoutError:  # a pipe held open by a process we could not kill (non-root)
            (out, out_over), (err, err_over) = (b"", True), (b"", True)
        layers, missing = _read_control(control_r)
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


def _read_control(fd: int) -> tuple[tuple[IsolationLayer, ...], list[str]]:
    """The layers the run reported, and why each requested one that is missing is missing."""
    data = b""
    with contextlib.suppress(BlockingIOError, OSError):
        while chunk := os.read(fd, 4096):
            data += chunk
    try:
        report = json.loads(data.decode() or "{}")
        return tuple(IsolationLayer(name) for name in report.get("layers", ())), list(report.get("missing", ()))
    except (ValueError, UnicodeDecodeError):
        return (), []


async def probe_isolation(isolation: Isolation = Isolation()) -> tuple[IsolationLayer, ...]:
    """The layers a trivial run gets on this machine (what every run here will have)."""
    result = await run_python("pass", SandboxLimits(wall_time_s=30), isolation=isolation)
    if not result.ok:
        raise RuntimeError(f"sandbox probe failed: {result.message}\n{result.stderr}")
    return result.isolation


# --------------------------------------------------------------------------------------------
# The child side: this file run as a script. Everything below runs in the sandbox process, first
# with the caller's privileges (to set up namespaces), then as the unprivileged per-run uid.

_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

_BLOCKED_EVENTS: dict[str, str] = {
    "subprocess.Popen": "starting processes",
    "os.system": "os.system",
    "os.exec": "exec",
    "os.posix_spawn": "spawning processes",
    "os.spawn": "spawning processes",
    "os.startfile": "starting processes",
    "pty.spawn": "spawning processes",
    "ctypes.dlsym": "ctypes",
    "ctypes.dlsym/handle": "ctypes",
    "ctypes.call_function": "ctypes",
    "ctypes.cdata": "ctypes",
    "ctypes.cdata/buffer": "ctypes",
    "ctypes.PyObj_FromPtr": "ctypes",
    "ctypes.string_at": "ctypes",
    "ctypes.wstring_at": "ctypes",
    "ctypes.addressof": "ctypes",
    "ctypes.set_errno": "ctypes",
}
# Events whose listed positional arguments are paths the operation writes to.
_WRITE_PATH_ARGS: dict[str, tuple[int, ...]] = {
    "os.remove": (0,),
    "os.rmdir": (0,),
    "os.mkdir": (0,),
    "os.rename": (0, 1),
    "os.link": (1,),
    "os.symlink": (1,),
    "os.chmod": (0,),
    "os.chown": (0,),
    "os.truncate": (0,),
    "os.utime": (0,),
    "os.setxattr": (0,),
    "os.removexattr": (0,),
    "os.chflags": (0,),
    "os.lchflags": (0,),
    "os.lchmod": (0,),
    "os.mkfifo": (0,),
    "os.mknod": (0,),
    "shutil.rmtree": (0,),
}
_WRITABLE_DEVICES = frozenset({"/dev/null", "/dev/stdout", "/dev/stderr"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class SandboxViolation(PermissionError):
    """Raised by the audit hook; uncaught, the run ends as ``blocked``."""


def _install_audit_hook(scratch: str) -> None:
    scratch_real = os.path.realpath(scratch)
    # The hook's own calls raise events too: skip those, per thread (a flag shared by threads
    # would let one thread's events through while another is inside the hook).
    state = _thread._local()

    def is_inside_scratch(path: Any, dir_fd: Any = None) -> bool:
        if isinstance(path, int):
            return True  # an fd that was already opened (and checked) earlier
        path = os.fsdecode(path)
        if path in _WRITABLE_DEVICES:
            return True
        try:
            if not os.path.isabs(path):
                relative_to_fd = isinstance(dir_fd, int) and dir_fd >= 0
                base = os.readlink(f"/proc/self/fd/{dir_fd}") if relative_to_fd else os.getcwd()
                path = os.path.join(base, path)
            real = os.path.realpath(path)
        except OSError:
            return False  # cannot tell where it goes: treat it as outside
        return real == scratch_real or real.startswith(scratch_real + os.sep)

    def refuse(what: str) -> None:
        raise SandboxViolation(f"sandbox: {what} is not allowed (the code runs offline, in its scratch dir)")

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if getattr(state, "inside", False):
            return
        state.inside = True
        try:
            if event.startswith("socket."):
                refuse("networking")
            what = _BLOCKED_EVENTS.get(event)
            if what:
                refuse(what)
            if event == "ctypes.dlopen" and args and args[0] is not None:
                refuse("loading native libraries with ctypes")
            if event == "open":
                path, mode, flags = (*args, None, None, None)[:3]
                writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    mode is None and isinstance(flags, int) and bool(flags & _WRITE_FLAGS)
                )
                if writes and path is not None and not is_inside_scratch(path):
                    refuse(f"writing {os.fsdecode(path)!r} outside the scratch directory")
            elif event in _WRITE_PATH_ARGS:
                dir_fd = args[-1] if event in ("os.remove", "os.rmdir", "os.mkdir") else None
                for i in _WRITE_PATH_ARGS[event]:
                    if i < len(args) and args[i] is not None and not is_inside_scratch(args[i], dir_fd):
                        refuse(f"changing {os.fsdecode(args[i])!r} outside the scratch directory")
        finally:
            state.inside = False

    sys.addaudithook(hook)


def _libc_call(libc: Any, name: str, *args: Any) -> None:
    if getattr(libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def _blocking_ancestor(path: str) -> str | None:
    """The outermost directory above ``path`` that other users cannot traverse, if any."""
    parts = Path(path).parts
    for i in range(2, len(parts)):
        ancestor = os.path.join(*parts[:i])
        try:
            if not os.stat(ancestor).st_mode & 0o001:
                return ancestor
        except OSError:
            return None
    return None


def _enter_mount_namespace(libc: Any, scratch: str, private_tmp: bool) -> None:
    """A private mount namespace: fresh tmpfs on the shared temp dirs (``private_tmp``), and the
    Python installation made reachable for the unprivileged uid.

    The interpreter may live where other users cannot look (pyenv under a 0700 /root): such a
    directory gets an empty tmpfs over it and only the import paths are bind-mounted back, so
    the code sees its interpreter and nothing else of that directory.
    """
    _libc_call(libc, "unshare", _CLONE_NEWNS)
    _libc_call(libc, "mount", b"none", b"/", None, _MS_REC | _MS_PRIVATE, None)
    needed = [scratch] + [p for p in sys.path if p and os.path.exists(p)]
    keep = {p: os.open(p, os.O_PATH) for p in needed}
    try:
        covers = {a for p in needed if (a := _blocking_ancestor(p))}
        if private_tmp:
            covers |= {d for d in _PRIVATE_TMP_DIRS if os.path.isdir(d) and not os.path.islink(d)}
        for target in sorted(covers, key=len):
            if any(target.startswith(c + os.sep) for c in covers if c != target):
                continue  # already hidden under an outer cover
            mode = "1777" if target in _PRIVATE_TMP_DIRS else "0755"
            opts = f"size={_PRIVATE_TMP_SIZE},mode={mode}".encode()
            _libc_call(libc, "mount", b"tmpfs", target.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, opts)
        for path in sorted(needed, key=len):
            if os.path.exists(path):
                continue  # still visible (or already bound back as part of a parent)
            if os.path.isdir(f"/proc/self/fd/{keep[path]}"):
                os.makedirs(path, mode=0o755)
            else:
                os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
            source = f"/proc/self/fd/{keep[path]}".encode()
            _libc_call(libc, "mount", source, path.encode(), None, _MS_BIND | _MS_REC, None)
    finally:
        for fd in keep.values():
            os.close(fd)


def _landlock_paths(scratch: str) -> tuple[list[str], list[str]]:
    """What a run may read (the interpreter, its libraries, the dynamic loader's cache) and write."""
    read = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    read |= {p for p in sys.path if p}
    read |= {"/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/etc/ld.so.cache",
             "/etc/localtime", "/usr/share/zoneinfo", "/dev/urandom", "/dev/zero"}
    return sorted(read), [scratch, "/dev/null"]


def _setup_tracker(config: dict[str, Any], libc: Any) -> tuple[bytes, list[IsolationLayer], list[str]]:
    """The layers every process of the run shares, applied in the tracker before it forks the run:
    namespaces and mounts (root only), rlimits, no_new_privs, the uid drop, the subreaper."""
    parent = os.getppid()
    code = sys.stdin.buffer.read()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    scratch: str = config["scratch"]
    layers: list[IsolationLayer] = []
    missing: list[str] = []

    if config["network_namespace"]:
        try:
            _libc_call(libc, "unshare", _CLONE_NEWNET)
            layers.append(IsolationLayer.NETWORK_NAMESPACE)
        except OSError as exc:
            missing.append(f"network_namespace ({exc})")
    if config["uid"] is not None:  # mount namespaces need root; without it the pod's own fs rules apply
        try:
            _enter_mount_namespace(libc, scratch, private_tmp=config["private_tmp"])
            if config["private_tmp"]:
                layers.append(IsolationLayer.PRIVATE_TMP)
        except OSError as exc:
            if config["private_tmp"]:
                missing.append(f"private_tmp ({exc})")
    elif config["private_tmp"]:
        missing.append("private_tmp (needs root)")
    os.chdir(scratch)

    cpu = math.ceil(config["cpu_time_s"])
    for limit, soft, hard in (
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_AS, config["memory_bytes"], config["memory_bytes"]),
        (resource.RLIMIT_NPROC, config["max_processes"], config["max_processes"]),
        (resource.RLIMIT_FSIZE, config["max_file_bytes"], config["max_file_bytes"]),
        (resource.RLIMIT_NOFILE, config["max_open_files"], config["max_open_files"]),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        resource.setrlimit(limit, (soft, hard))  # failure is a setup error: no run without limits
    layers.append(IsolationLayer.RLIMITS)

    if config["no_new_privs"]:
        try:
            _libc_call(libc, "prctl", _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            layers.append(IsolationLayer.NO_NEW_PRIVS)
        except OSError as exc:
            missing.append(f"no_new_privs ({exc})")

    uid = config["uid"]
    if uid is not None:  # the caller is root: never run the code with root's powers
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid):
            raise OSError(errno.EPERM, f"could not drop to uid {uid}")
        try:
            os.setuid(0)
        except PermissionError:
            layers.append(IsolationLayer.UNPRIVILEGED_UID)
        else:
            raise OSError(errno.EPERM, "root privileges could be regained after the uid drop")
        unreadable = [p for p in sys.path if p and os.path.isdir(p) and not os.access(p, os.R_OK | os.X_OK)]
        if unreadable:
            raise OSError(
                errno.EACCES,
                f"uid {uid} cannot read the Python installation at {unreadable[0]}; install Python where "
                "other users can read it, or allow mount namespaces (CAP_SYS_ADMIN)",
            )
    # Die with the caller instead of running on as an orphan (a uid change clears this, so now).
    _libc_call(libc, "prctl", _PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(137)  # the caller died before the signal was armed
    # Same-uid code must not read the tracker's memory or /proc files either.
    _libc_call(libc, "prctl", _PR_SET_DUMPABLE, 0, 0, 0, 0)
    # Orphans of the run (a double fork, a setsid daemon) become the tracker's children, not
    # init's, so the tracker can find and kill them when the run ends.
    _libc_call(libc, "prctl", _PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    layers.append(IsolationLayer.PROCESS_TRACKING)
    return code, layers, missing


def _setup_run(config: dict[str, Any], libc: Any, layers: list[IsolationLayer], missing: list[str]) -> None:
    """The layers of the process that runs the code, applied after the tracker forked it: its own
    process group, Landlock, the seccomp filter, the audit hook. Then the report to the caller."""
    tracker = os.getppid()
    os.setpgid(0, 0)  # the run's group: kill(0) and killpg reach the run, never the tracker
    _libc_call(libc, "prctl", _PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != tracker:
        os._exit(137)
    scratch: str = config["scratch"]
    # Imported (and libseccomp loaded) before Landlock hides the files they come from.
    from flowlane.runtime import sandbox_landlock, sandbox_seccomp

    binding_error: Exception | None = None
    if config["seccomp"]:
        try:
            sandbox_seccomp.load_binding()
        except (ImportError, OSError) as exc:
            binding_error = exc
    if config["landlock"]:
        try:
            read, read_write = _landlock_paths(scratch)
            sandbox_landlock.restrict_self(read, read_write)
            layers.append(IsolationLayer.LANDLOCK)
        except OSError as exc:
            missing.append(f"landlock ({exc.strerror or exc})")
    if config["seccomp"]:
        try:
            if binding_error is not None:
                raise binding_error
            sandbox_seccomp.install_filter(os.getpid())
            layers.append(IsolationLayer.SECCOMP)
        except (ImportError, OSError) as exc:
            missing.append(f"seccomp ({exc})")
    if config["audit_hook"]:
        _install_audit_hook(scratch)
        layers.append(IsolationLayer.AUDIT_HOOK)

    if config["strict"] and missing:
        raise OSError(errno.EPERM, "strict isolation: unavailable layers: " + "; ".join(missing))
    control_fd = config["control_fd"]
    os.write(control_fd, json.dumps({"layers": layers, "missing": missing}).encode())
    os.close(control_fd)


def _children_of(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:  # no CONFIG_PROC_CHILDREN: scan /proc for the parent pid
        children = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    stat = Path(entry.path, "stat").read_text()
                    if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                        children.append(int(entry.name))
        return children


def _reap_all() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _sweep(run_pid: int) -> None:
    """Kill every process left of the run. As the subreaper the tracker inherits every orphan, so
    its children are all that is left; each round kills them, and the orphans of the killed become
    its children for the next round. RLIMIT_NPROC bounds how many rounds a fork loop can force."""
    me = os.getpid()
    with contextlib.suppress(OSError):
        os.killpg(run_pid, signal.SIGKILL)
    for _ in range(1000):
        children = _children_of(me)
        if not children:
            break
        for child in children:
            with contextlib.suppress(OSError):
                os.kill(child, signal.SIGKILL)
        time.sleep(0.001)
        _reap_all()
    _reap_all()


class _Stop(Exception):
    """SIGTERM to the tracker: the caller's deadline passed."""


def _track(run_pid: int) -> None:
    """The tracker's life after the fork: wait for the run, reaping orphans meanwhile; then kill
    whatever is left and end the way the run's process ended."""

    def stop(signum: int, frame: Any) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, stop)
    status: int | None = None
    try:
        while status is None:
            pid, wait_status = os.waitpid(-1, 0)
            if pid == run_pid:
                status = wait_status
    except _Stop:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _sweep(run_pid)
    if status is None:
        os._exit(128 + signal.SIGTERM)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        with contextlib.suppress(OSError, ValueError):  # SIGKILL has no handler to reset
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # a signal whose default action does not end a process
    os._exit(os.waitstatus_to_exitcode(status))


_CODE_FILENAME = "<code>"


def _run_user_code(code: bytes) -> None:
    source = code.decode("utf-8", errors="replace")
    # Tracebacks then quote the failing line, which helps the LLM that wrote it.
    linecache.cache[_CODE_FILENAME] = (len(source), None, source.splitlines(True), _CODE_FILENAME)
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main
    sys.argv = [_CODE_FILENAME]
    exec(compile(source, _CODE_FILENAME, "exec"), main.__dict__)


def _exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, MemoryError):
        return _EXIT_MEMORY
    if isinstance(exc, SandboxViolation):
        return _EXIT_BLOCKED
    if isinstance(exc, BlockingIOError) or (
        isinstance(exc, RuntimeError) and "can't start new thread" in str(exc)
    ):
        return _EXIT_PROCESS
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return _EXIT_FILE
    return 1


def _format_without_sandbox_frames(exc: BaseException) -> list[str]:
    """The traceback minus the bootstrap's and the audit hook's frames: the LLM that wrote the
    code needs its own frames, not ours."""
    this_file = os.path.realpath(__file__)
    formatted = traceback.TracebackException.from_exception(exc)
    seen: set[int] = set()
    pending = [formatted]
    while pending:
        te = pending.pop()
        if id(te) in seen:
            continue
        seen.add(id(te))
        te.stack = traceback.StackSummary.from_list(
            [frame for frame in te.stack if os.path.realpath(frame.filename) != this_file]
        )
        pending += [c for c in (te.__cause__, te.__context__) if c is not None]
    return list(formatted.format())


def _child_main() -> None:
    # Line-buffered, so a run killed at the deadline still shows what it printed so far.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True)
    config = json.loads(sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        code, layers, missing = _setup_tracker(config, libc)
        run_pid = os.fork()
    except BaseException as exc:
        print(f"sandbox setup failed: {exc}", file=sys.stderr, flush=True)
        os._exit(_EXIT_SETUP)
    if run_pid:
        os.close(config["control_fd"])
        devnull = os.open(os.devnull, os.O_WRONLY)  # only the run holds the output pipes
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        _track(run_pid)
    try:
        _setup_run(config, libc, layers, missing)
    except BaseException as exc:
        print(f"sandbox setup failed: {exc}", file=sys.stderr, flush=True)
        os._exit(_EXIT_SETUP)
    try:
        _run_user_code(code)
    except SystemExit:
        raise
    except BaseException as exc:
        status = _exit_code_for(exc)
        with contextlib.suppress(BaseException):
            print("".join(_format_without_sandbox_frames(exc)), end="", file=sys.stderr)
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)


if __name__ == "__main__":
    _child_main()
