"""The sandbox escape suite: attempts untrusted code makes to get out, as data, and a runner.

Each ``Escape`` is a snippet plus the layer expected to stop it and the error that layer gives.
The runner (``run_escapes``) executes every case through the real sandbox
(``flowlane.runtime.sandbox.run_python``) with the privileges of the current process, checks from
outside that nothing got through (victim files unchanged, listeners never reached, victim
processes alive, no process of the run left), and names the layer that stopped each attempt.

It needs no pytest and writes only under a temporary directory, so the same file runs in three
places: ``tests/test_sandbox.py`` (as root and, through ``setpriv``, as uid 10001 without
capabilities), and inside the built sandbox image as its own user on a read-only root::

    python tests/sandbox_escapes.py --json     # prints the results; exit 1 if any case escaped

Snippet protocol: the code prints ``ESCAPED`` when the attempt worked, or ``BLOCKED <exception
class> <errno name>`` when it failed; limit cases are judged by the result's error kind.
Most attempts run with the audit hook off (``hook=False``): the hook is not a security boundary,
so the kernel layers must hold without it. A few run with it, to show it answers first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowlane.runtime.sandbox.layers import Isolation, IsolationLayer
from flowlane.runtime.sandbox.limits import SandboxLimits
from flowlane.runtime.sandbox.result import SandboxErrorKind, SandboxResult
from flowlane.runtime.sandbox.runner import run_python

LIMITS = SandboxLimits(cpu_time_s=2, wall_time_s=8, memory_bytes=256 * 1024 * 1024, max_processes=24,
                       max_file_bytes=4 * 1024 * 1024, max_output_bytes=64 * 1024)
_PRIVATE_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")

# Every attempt reports the same way: ESCAPED, or BLOCKED with the exception and errno it met.
_REPORT = """
def _report(attempt):
    try:
        attempt()
    except BaseException as exc:
        name = errno.errorcode.get(getattr(exc, "errno", None) or 0, "-")
        print("BLOCKED", type(exc).__name__, name, flush=True)
    else:
        print("ESCAPED", flush=True)
"""
_PRELUDE = "import errno, os, signal, socket, sys, time\n" + _REPORT


@dataclass(frozen=True)
class Stop:
    """The layer expected to stop an attempt and the error by which it shows (errno name or, for
    the audit hook, the exception class)."""

    layer: IsolationLayer
    error: str


@dataclass(frozen=True)
class Escape:
    name: str
    code: str  # formatted with the victims' details: see Victims.fields()
    stop: Stop  # as the pod's uid (no capabilities)
    stop_as_root: Stop | None = None  # as root, where the uid drop or private /tmp answers first
    hook: bool = False  # run with the audit hook on
    limits: SandboxLimits = LIMITS
    #: For limit cases: the error kind the result must have (None: must end ok).
    expect_kind: SandboxErrorKind | None = None
    expect_truncated: bool = False
    hidden_as_root: Stop | None = None  # when the victim sits in a private tmp dir as root


SECCOMP_EPERM = Stop(IsolationLayer.SECCOMP, "EPERM")
SECCOMP_NO_FAMILY = Stop(IsolationLayer.SECCOMP, "EAFNOSUPPORT")
LANDLOCK = Stop(IsolationLayer.LANDLOCK, "EACCES")
UID = Stop(IsolationLayer.UNPRIVILEGED_UID, "EACCES")
HIDDEN = Stop(IsolationLayer.PRIVATE_TMP, "ENOENT")
HOOK = Stop(IsolationLayer.AUDIT_HOOK, "SandboxViolation")
NON_DUMPABLE = Stop(IsolationLayer.NON_DUMPABLE_CALLER, "EACCES")

_FORK_EXEC = """
import _posixsubprocess
def attempt():
    r, w = os.pipe()
    args = ([b"/bin/true"], [b"/bin/true"], True, (w,), None, None, -1, -1, -1, -1, -1, -1, r, w,
            True, False, -1, None, None, None, -1, None)
    try:
        pid = _posixsubprocess.fork_exec(*args, False)
    except TypeError:  # an older 3.11 without the vfork flag
        pid = _posixsubprocess.fork_exec(*args)
    os.close(w)
    failure = b""
    while chunk := os.read(r, 200):  # EOF once the child exec'd or exited
        failure += chunk
    os.waitpid(pid, 0)
    if failure:  # "OSError:<hex errno>:..." from the child, as subprocess reads it
        raise OSError(int(failure.split(b":")[1], 16), "exec failed")
_report(attempt)
"""

ESCAPES: tuple[Escape, ...] = (
    # exec: a fresh interpreter would run without the audit hook and the per-run checks
    Escape("exec_via_posixsubprocess_fork_exec", _FORK_EXEC, SECCOMP_EPERM, hook=True),
    Escape("exec_via_os_posix_spawn", "_report(lambda: os.posix_spawn('/bin/true', ['true'], {}))", SECCOMP_EPERM),
    Escape("exec_via_os_posix_spawn_with_the_hook", "_report(lambda: os.posix_spawn('/bin/true', ['true'], {}))",
           HOOK, hook=True),
    Escape("exec_via_ctypes", """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
def attempt():
    argv = (ctypes.c_char_p * 2)(b"/bin/true", None)
    libc.execv(b"/bin/true", argv)
    raise OSError(ctypes.get_errno(), "execv")
_report(attempt)
""", SECCOMP_EPERM),
    # other processes' secrets
    Escape("read_the_servers_proc_environ", "_report(lambda: open('/proc/{server_pid}/environ', 'rb').read())",
           NON_DUMPABLE, stop_as_root=UID),
    Escape("read_the_servers_proc_mem", "_report(lambda: open('/proc/{server_pid}/mem', 'rb').read(1))",
           NON_DUMPABLE, stop_as_root=UID),
    Escape("read_a_dumpable_neighbours_proc_environ",
           "_report(lambda: open('/proc/{neighbour_pid}/environ', 'rb').read())", LANDLOCK, stop_as_root=UID),
    Escape("ptrace_the_server", """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
def attempt():
    if libc.ptrace(16, {server_pid}, None, None) != 0:  # PTRACE_ATTACH
        raise OSError(ctypes.get_errno(), "ptrace")
_report(attempt)
""", SECCOMP_EPERM),
    # signals
    Escape("signal_the_server", "_report(lambda: os.kill({server_pid}, signal.SIGKILL))", SECCOMP_EPERM),
    Escape("signal_every_process_of_the_uid", "_report(lambda: os.kill(-1, signal.SIGKILL))", SECCOMP_EPERM),
    Escape("signal_another_run", "_report(lambda: os.kill({other_run_pid}, signal.SIGKILL))", SECCOMP_EPERM),
    Escape("signal_another_runs_group", "_report(lambda: os.killpg({other_run_pid}, signal.SIGKILL))",
           SECCOMP_EPERM),
    # network
    Escape("connect_to_loopback_tcp",
           "_report(lambda: socket.create_connection(('127.0.0.1', {tcp_port}), timeout=2))", SECCOMP_NO_FAMILY),
    Escape("connect_to_the_servers_unix_socket",
           "_report(lambda: socket.socket(socket.AF_UNIX).connect({unix_path!r}))", SECCOMP_EPERM),
    Escape("connect_to_an_abstract_unix_socket",
           "_report(lambda: socket.socket(socket.AF_UNIX).connect({abstract_name!r}))", SECCOMP_EPERM),
    Escape("send_a_unix_datagram", "_report(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))",
           SECCOMP_EPERM),
    Escape("connect_to_any_address_over_ipv6",
           "_report(lambda: socket.create_connection(('2001:db8::1', 80), timeout=2))", SECCOMP_NO_FAMILY),
    Escape("send_udp_anywhere", "_report(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
           ".sendto(b'x', ('192.0.2.1', 53)))", SECCOMP_NO_FAMILY),
    Escape("open_a_socket_with_the_hook", "_report(lambda: socket.socket())", HOOK, hook=True),
    # writing outside scratch
    Escape("write_outside_scratch_with_open", "_report(lambda: open('{victim_dir}/open.txt', 'w').write('x'))",
           LANDLOCK, hidden_as_root=HIDDEN),
    Escape("write_outside_scratch_with_dir_fd", """
def attempt():
    fd = os.open({victim_dir!r}, os.O_PATH)
    os.close(os.open('dirfd.txt', os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
_report(attempt)
""", LANDLOCK, hidden_as_root=HIDDEN),
    Escape("write_outside_scratch_with_rename", """
open('moved.txt', 'w').write('x')
_report(lambda: os.rename('moved.txt', '{victim_dir}/moved.txt'))
""", LANDLOCK, hidden_as_root=HIDDEN),
    Escape("write_outside_scratch_with_symlink", "_report(lambda: os.symlink('/etc/passwd', '{victim_dir}/link'))",
           LANDLOCK, hidden_as_root=HIDDEN),
    Escape("write_outside_scratch_with_hardlink", """
open('linked.txt', 'w').write('x')
_report(lambda: os.link('linked.txt', '{victim_dir}/linked.txt'))
""", LANDLOCK, hidden_as_root=HIDDEN),
    Escape("write_outside_scratch_with_mmap", """
import mmap
def attempt():
    fd = os.open('{victim_dir}/existing.txt', os.O_RDWR)
    with mmap.mmap(fd, 8) as m:
        m[:8] = b'ESCAPED!'
_report(attempt)
""", LANDLOCK, hidden_as_root=HIDDEN),
    Escape("write_outside_scratch_with_the_hook", "_report(lambda: open('{victim_dir}/hook.txt', 'w'))",
           HOOK, hook=True),
    Escape("read_another_runs_scratch", "_report(lambda: open('{other_scratch}/secret.txt').read())",
           LANDLOCK, stop_as_root=UID, hidden_as_root=HIDDEN),
    # processes that outlive the run
    Escape("setsid_daemon_outlives_the_run", """
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(w, str(os.getpid()).encode())
        time.sleep(60)
    os._exit(0)
os.close(w)
print('DAEMON', os.read(r, 32).decode(), flush=True)
""", Stop(IsolationLayer.PROCESS_TRACKING, "-")),
    # resources
    Escape("fork_bomb", "while True:\n    os.fork()", Stop(IsolationLayer.RLIMITS, "-"),
           expect_kind=SandboxErrorKind.PROCESS_LIMIT),
    Escape("memory_hog", "chunks = []\nwhile True:\n    chunks.append(bytearray(10_000_000))",
           Stop(IsolationLayer.RLIMITS, "-"), expect_kind=SandboxErrorKind.MEMORY_LIMIT),
    Escape("disk_fill", "with open('fill.bin', 'wb') as f:\n    while True:\n        f.write(b'x' * 1_000_000)",
           Stop(IsolationLayer.RLIMITS, "-"), expect_kind=SandboxErrorKind.FILE_LIMIT),
    Escape("cpu_loop", "while True:\n    pass", Stop(IsolationLayer.RLIMITS, "-"),
           expect_kind=SandboxErrorKind.CPU_LIMIT),
    Escape("huge_output_on_both_streams",
           "for _ in range(1000):\n    sys.stdout.write('x' * 100_000)\n    sys.stderr.write('y' * 100_000)",
           Stop(IsolationLayer.RLIMITS, "-"), limits=SandboxLimits(cpu_time_s=30, wall_time_s=60),
           expect_truncated=True),
    # bad input
    Escape("never_returns", "time.sleep(3600)", Stop(IsolationLayer.RLIMITS, "-"),
           limits=SandboxLimits(wall_time_s=2), expect_kind=SandboxErrorKind.TIMEOUT),
    Escape("prints_a_gigabyte", "chunk = b'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.buffer.write(chunk)",
           Stop(IsolationLayer.RLIMITS, "-"), limits=SandboxLimits(cpu_time_s=30, wall_time_s=60),
           expect_truncated=True),
    Escape("closes_its_own_stdout", "os.close(1)\nos.close(2)\ntime.sleep(0.2)", Stop(IsolationLayer.RLIMITS, "-")),
)


@dataclass
class Victims:
    """What the attempts aim at, set up by the runner outside the sandbox."""

    root: Path
    server: subprocess.Popen[bytes]  # non-dumpable, holding a secret in its environment
    neighbour: subprocess.Popen[bytes]  # a dumpable process of the same uid
    tcp: socket.socket
    unix: socket.socket
    abstract: socket.socket
    other_run_pid: int = 0
    connections: list[str] = field(default_factory=list)

    def fields(self) -> dict[str, Any]:
        return {"server_pid": self.server.pid, "neighbour_pid": self.neighbour.pid,
                "tcp_port": self.tcp.getsockname()[1], "unix_path": str(self.root / "server.sock"),
                "abstract_name": "\0" + self.abstract.getsockname()[1:].decode(),
                "victim_dir": str(self.root / "victim"), "other_scratch": str(self.root / "other-scratch"),
                "other_run_pid": self.other_run_pid or 1}

    def accept_all(self) -> None:
        for listener in (self.tcp, self.unix, self.abstract):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, OSError):
                continue
            self.connections.append(str(listener.getsockname()))
            conn.close()


_SLEEPER = "import ctypes, time\nif {non_dumpable}: ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)\ntime.sleep(3600)"


def _set_up_victims(root: Path) -> Victims:
    root.chmod(0o755)
    victim = root / "victim"
    victim.mkdir(mode=0o777)
    victim.chmod(0o777)  # writable for any uid: only the sandbox may say no
    (victim / "existing.txt").write_bytes(b"original")
    (victim / "existing.txt").chmod(0o666)
    other = root / "other-scratch"
    other.mkdir(mode=0o700)
    (other / "secret.txt").write_text("another run's data")
    if os.geteuid() == 0:
        os.chown(other, 45000, 45000)  # as root, another run's scratch belongs to its own uid
    env = {"FLOWLANE_GRPC_TOKEN": "the-server-secret", "PATH": "/usr/bin:/bin"}
    server = subprocess.Popen([sys.executable, "-c", _SLEEPER.format(non_dumpable=True)], env=env)
    neighbour = subprocess.Popen([sys.executable, "-c", _SLEEPER.format(non_dumpable=False)], env=env)
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(root / "server.sock"))
    os.chmod(root / "server.sock", 0o777)
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0flowlane-escapes-{os.getpid()}")
    for listener in (tcp, unix, abstract):
        listener.listen(8)
        listener.setblocking(False)
    return Victims(root, server, neighbour, tcp, unix, abstract)


def _tear_down(victims: Victims) -> None:
    for proc in (victims.server, victims.neighbour):
        proc.kill()
        proc.wait()
    for listener in (victims.tcp, victims.unix, victims.abstract):
        listener.close()


def _observed(result: SandboxResult) -> tuple[bool | None, str]:
    """(escaped?, error) from the snippet's report line; None when it printed no report."""
    for line in reversed(result.stdout.splitlines()):
        if line == "ESCAPED":
            return True, ""
        if line.startswith("BLOCKED "):
            _, exc_class, errno_name = line.split()
            return False, exc_class if exc_class == "SandboxViolation" else errno_name
    return None, ""


def _process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _in_private_tmp(path: Path) -> bool:
    return any(str(path) == d or str(path).startswith(d + "/") for d in _PRIVATE_TMP_DIRS)


async def _run_case(case: Escape, victims: Victims, as_root: bool) -> dict[str, Any]:
    isolation = Isolation(audit_hook=case.hook)
    code = case.code
    for key, value in victims.fields().items():  # not str.format: snippets have braces of their own
        code = code.replace("{" + key + "!r}", repr(value)).replace("{" + key + "}", str(value))
    code = _PRELUDE + code
    before = (victims.root / "victim" / "existing.txt").read_bytes()
    result = await run_python(code, case.limits, isolation=isolation)
    victims.accept_all()
    expected = case.stop
    if as_root:
        hidden = case.hidden_as_root and IsolationLayer.PRIVATE_TMP in result.isolation and _in_private_tmp(
            victims.root)
        expected = (case.hidden_as_root if hidden else None) or case.stop_as_root or case.stop
    problems: list[str] = []
    stopped_by: str | None = None
    if case.expect_kind is not None or case.stop.layer in (IsolationLayer.RLIMITS,):
        stopped_by = IsolationLayer.RLIMITS.value
        if result.error_kind is not case.expect_kind:
            problems.append(f"ended as {result.error_kind}, expected {case.expect_kind}: {result.message}")
        if result.truncated != case.expect_truncated:
            problems.append(f"truncated={result.truncated}, expected {case.expect_truncated}")
    elif case.stop.layer is IsolationLayer.PROCESS_TRACKING:
        pids = [int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("DAEMON ")]
        if not pids:
            problems.append(f"the daemon never reported its pid: {result.message} {result.stderr[-300:]}")
        elif _process_alive(pids[0]):
            problems.append(f"daemon {pids[0]} is still running after the run")
            os.kill(pids[0], signal.SIGKILL)
        else:
            stopped_by = IsolationLayer.PROCESS_TRACKING.value
    else:
        escaped, error = _observed(result)
        if escaped is None:
            problems.append(f"no report: {result.message} {result.stderr[-300:]}")
        elif escaped:
            problems.append("the attempt worked")
        elif error != expected.error:
            problems.append(f"stopped with {error}, expected {expected.error} from {expected.layer.value}")
        elif expected.layer not in result.isolation and expected.layer is not IsolationLayer.NON_DUMPABLE_CALLER:
            problems.append(f"{expected.layer.value} is not in force: {[x.value for x in result.isolation]}")
        else:
            stopped_by = expected.layer.value
    # Checks from outside, whatever the code said.
    if victims.connections:
        problems.append(f"a listener was reached: {victims.connections}")
        victims.connections.clear()
    if not (_process_alive(victims.server.pid) and _process_alive(victims.neighbour.pid)):
        problems.append("a victim process was killed")
    if (victims.root / "victim" / "existing.txt").read_bytes() != before:
        problems.append("a file outside scratch was changed")
    stray = sorted(p.name for p in (victims.root / "victim").iterdir() if p.name != "existing.txt")
    if stray:
        problems.append(f"files appeared outside scratch: {stray}")
        for name in stray:
            (victims.root / "victim" / name).unlink()
    return {"name": case.name, "held": not problems, "stopped_by": stopped_by,
            "expected": expected.layer.value, "error_kind": result.error_kind.value if result.error_kind else None,
            "duration_s": round(result.duration_s, 3), "problems": problems}


async def _find_run_process(before: set[int], timeout_s: float = 10.0) -> int:
    """The process that runs the code of a run just started: a new process named like our
    interpreter whose parent is a new process too (the run's tracker)."""
    deadline = time.monotonic() + timeout_s
    me = os.getpid()
    while time.monotonic() < deadline:
        fresh = {int(p) for p in os.listdir("/proc") if p.isdigit()} - before
        parents = {}
        for pid in fresh:
            try:
                parents[pid] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
        for pid, parent in parents.items():
            if parents.get(parent) == me:
                return pid
        await asyncio.sleep(0.05)
    raise RuntimeError("the other run never started")


async def run_escapes(work_dir: Path | None = None, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Run every case (or those named) through the sandbox; one result dict per case."""
    as_root = os.geteuid() == 0
    cases = [c for c in ESCAPES if names is None or c.name in names]
    with tempfile.TemporaryDirectory(prefix="flowlane-escapes-", dir=work_dir) as tmp:
        victims = _set_up_victims(Path(tmp))
        try:
            results = []
            for case in cases:
                other_run = None
                if "other_run_pid" in case.code:
                    before = {int(p) for p in os.listdir("/proc") if p.isdigit()}
                    other_run = asyncio.create_task(run_python("import time\ntime.sleep(4)\nprint('alive')"))
                    victims.other_run_pid = await _find_run_process(before)
                result = await _run_case(case, victims, as_root)
                if other_run is not None:
                    other = await other_run
                    if other.stdout != "alive\n":
                        result["held"] = False
                        result["problems"].append(f"the other run was disturbed: {other.message}")
                results.append(result)
            return results
        finally:
            _tear_down(victims)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document with every result")
    parser.add_argument("--work-dir", type=Path, default=None, help="where victims live (default: the temp dir)")
    parser.add_argument("cases", nargs="*", help="case names (default: all)")
    args = parser.parse_args()
    results = asyncio.run(run_escapes(args.work_dir, args.cases or None))
    if args.json:
        print(json.dumps({"uid": os.geteuid(), "results": results}, indent=1))
    else:
        for r in results:
            print(f"{'held  ' if r['held'] else 'FAILED'} {r['name']:<45} {r['stopped_by'] or '-':<20} "
                  + "; ".join(r["problems"]))
    sys.exit(0 if all(r["held"] for r in results) else 1)


if __name__ == "__main__":
    main()
