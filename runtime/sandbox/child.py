"""The sandbox's child side: the bootstrap that applies the layers and then runs the code.

Why a module of its own: it starts once per execution, so what it imports is paid on every tool
call. It imports only what CPython's start-up already has or what is built in (``os``, ``sys``,
``ctypes``, ``resource``, ``marshal``, ``_signal``, ``_thread``), never ``flowlane`` or anything
that pulls in ``re``, ``enum`` or ``asyncio``, and the interpreter runs with ``-I -S -B``
(``site`` and its ``.pth`` files would cost more than the rest of the bootstrap together). The
caller (``runtime/sandbox/runner.py``) does the expensive work once: it builds the seccomp program with
libseccomp and passes its bytes, and it passes the import path the code should see (the
interpreter's site-packages). Everything arrives on stdin as one ``marshal`` blob (built in, so no
``json`` import): the settings, the seccomp program and the code.

The process tree of a run, and which layer each process applies (see ``runtime/sandbox/runner.py`` for
what every layer is for)::

    caller ── tracker (namespaces and mounts as root, rlimits, no_new_privs, uid drop,
              │        non-dumpable, child subreaper)
              └── run (own process group, Landlock, seccomp, audit hook; then the code)

The run reports its layers on a private pipe before the code starts and closes it; the tracker
writes ``swept N`` on the same pipe once it has killed every process the run left (N of them), so
the caller knows nothing of the run is left. Lines on the pipe::

    layer <name>          a layer in force
    missing <why>         a requested layer that could not be applied
    swept <count>         written by the tracker after its sweep
"""

# ruff: noqa: SIM105 (contextlib.suppress would cost the contextlib import on every run)
from __future__ import annotations

import _signal
import _thread
import builtins
import ctypes
import errno
import io
import marshal
import os
import resource
import struct
import sys
import time

TYPE_CHECKING = False  # typing itself costs an import in every run; mypy reads this name as usual
if TYPE_CHECKING:
    from typing import Any

# Exit codes the bootstrap uses to classify an uncaught exception (user code can fake them, which
# only misreports its own failure).
EXIT_MEMORY = 102
EXIT_BLOCKED = 103
EXIT_PROCESS = 104
EXIT_FILE = 105
EXIT_SETUP = 106

CODE_FILENAME = "<code>"
PRIVATE_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
_PRIVATE_TMP_SIZE = "16m"

_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
_PR_SET_SECCOMP = 22
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38
_PR_GET_NO_NEW_PRIVS = 39
_SECCOMP_MODE_FILTER = 2
#: The pid the caller builds the seccomp program for; the run puts its own pid in its place.
SECCOMP_PID_PLACEHOLDER = 0x3A5C0F1E
_BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_BPF_INSTRUCTION = struct.Struct("HBBI")  # struct sock_filter: code, jt, jf, k
_SIGKILL = _signal.SIGKILL
_SIGTERM = _signal.SIGTERM

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


_libc = ctypes.CDLL(None, use_errno=True)
_ulong = ctypes.c_ulong


def prctl(option: int, arg2: int = 0, arg3: Any = 0) -> int:
    """prctl(2) with unsigned long arguments (the kernel checks that unused ones are 0)."""
    third = _ulong(arg3) if isinstance(arg3, int) else arg3  # or a pointer (ctypes.byref)
    result = int(_libc.prctl(option, _ulong(arg2), third, _ulong(0), _ulong(0)))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")
    return result


def _libc_call(name: str, *args: Any) -> None:
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_program_for(template: bytes, run_pid: int) -> bytes:
    """The caller's program with ``run_pid`` where it has the placeholder pid (and ``-run_pid``
    where it has the placeholder's negation): the argument checks of kill and friends.

    Only the constants of equality jumps change, and a pid and the placeholder both fit in 31
    bits, so the result is instruction for instruction what libseccomp builds for ``run_pid``
    (``tests/test_sandbox.py`` compares the two)."""
    negated = -SECCOMP_PID_PLACEHOLDER & 0xFFFFFFFF
    out = bytearray(template)
    for offset in range(0, len(out), _BPF_INSTRUCTION.size):
        code, jt, jf, k = _BPF_INSTRUCTION.unpack_from(out, offset)
        if code == _BPF_JEQ_K and k in (SECCOMP_PID_PLACEHOLDER, negated):
            k = run_pid if k == SECCOMP_PID_PLACEHOLDER else -run_pid & 0xFFFFFFFF
            _BPF_INSTRUCTION.pack_into(out, offset, code, jt, jf, k)
    return bytes(out)


def load_seccomp_program(program: bytes) -> None:
    """Install a seccomp-bpf program (``struct sock_filter`` array, as libseccomp exports it) into
    this process and every process it starts. Sets no_new_privs first, as libseccomp's own load does
    (without it only CAP_SYS_ADMIN may install a filter)."""
    if len(program) % 8 or not program:
        raise OSError(errno.EINVAL, f"a seccomp program is whole 8-byte instructions, got {len(program)} bytes")
    if not prctl(_PR_GET_NO_NEW_PRIVS):
        prctl(_PR_SET_NO_NEW_PRIVS, 1)
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog))


def _blocking_ancestor(path: str) -> str | None:
    """The outermost directory above ``path`` that other users cannot traverse, if any."""
    parts = path.split(os.sep)
    for i in range(2, len(parts)):
        ancestor = os.sep.join(parts[:i])
        try:
            if not os.stat(ancestor).st_mode & 0o001:
                return ancestor
        except OSError:
            return None
    return None


def _enter_mount_namespace(scratch: str, private_tmp: bool) -> None:
    """A private mount namespace: fresh tmpfs on the shared temp dirs (``private_tmp``), and the
    Python installation made reachable for the unprivileged uid.

    The interpreter may live where other users cannot look (pyenv under a 0700 /root): such a
    directory gets an empty tmpfs over it and only the import paths are bind-mounted back, so
    the code sees its interpreter and nothing else of that directory.
    """
    _libc_call("unshare", _CLONE_NEWNS)
    _libc_call("mount", b"none", b"/", None, _MS_REC | _MS_PRIVATE, None)
    needed = [scratch] + [p for p in sys.path if p and os.path.exists(p)]
    keep = {p: os.open(p, os.O_PATH) for p in needed}
    try:
        covers = {a for p in needed if (a := _blocking_ancestor(p))}
        if private_tmp:
            covers |= {d for d in PRIVATE_TMP_DIRS if os.path.isdir(d) and not os.path.islink(d)}
        for target in sorted(covers, key=len):
            if any(target.startswith(c + os.sep) for c in covers if c != target):
                continue  # already hidden under an outer cover
            mode = "1777" if target in PRIVATE_TMP_DIRS else "0755"
            opts = f"size={_PRIVATE_TMP_SIZE},mode={mode}".encode()
            _libc_call("mount", b"tmpfs", target.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, opts)
        for path in sorted(needed, key=len):
            if os.path.exists(path):
                continue  # still visible (or already bound back as part of a parent)
            if os.path.isdir(f"/proc/self/fd/{keep[path]}"):
                os.makedirs(path, mode=0o755)
            else:
                os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
            source = f"/proc/self/fd/{keep[path]}".encode()
            _libc_call("mount", source, path.encode(), None, _MS_BIND | _MS_REC, None)
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


def _report(fd: int, lines: list[str]) -> None:
    os.write(fd, "".join(line.replace("\n", " ") + "\n" for line in lines).encode())


def _setup_tracker(config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The layers every process of the run shares, applied in the tracker before it forks the run:
    namespaces and mounts (root only), rlimits, no_new_privs, the uid drop, the subreaper.
    Returns the layers in force and why requested ones are missing."""
    parent = os.getppid()
    scratch: str = config["scratch"]
    layers: list[str] = []
    missing: list[str] = []

    if config["network_namespace"]:
        try:
            _libc_call("unshare", _CLONE_NEWNET)
            layers.append("network_namespace")
        except OSError as exc:
            missing.append(f"network_namespace ({exc})")
    if config["uid"] is not None:  # mount namespaces need root; without it the pod's own fs rules apply
        try:
            _enter_mount_namespace(scratch, private_tmp=config["private_tmp"])
            if config["private_tmp"]:
                layers.append("private_tmp")
        except OSError as exc:
            if config["private_tmp"]:
                missing.append(f"private_tmp ({exc})")
    elif config["private_tmp"]:
        missing.append("private_tmp (needs root)")
    os.chdir(scratch)

    cpu = config["cpu_time_s"]
    for limit, soft, hard in (
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_AS, config["memory_bytes"], config["memory_bytes"]),
        (resource.RLIMIT_NPROC, config["max_processes"], config["max_processes"]),
        (resource.RLIMIT_FSIZE, config["max_file_bytes"], config["max_file_bytes"]),
        (resource.RLIMIT_NOFILE, config["max_open_files"], config["max_open_files"]),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        resource.setrlimit(limit, (soft, hard))  # failure is a setup error: no run without limits
    layers.append("rlimits")

    if config["no_new_privs"]:
        try:
            prctl(_PR_SET_NO_NEW_PRIVS, 1)
            layers.append("no_new_privs")
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
            layers.append("unprivileged_uid")
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
    prctl(_PR_SET_PDEATHSIG, _SIGKILL)
    if os.getppid() != parent:
        os._exit(137)  # the caller died before the signal was armed
    # Same-uid code must not read the tracker's memory or /proc files either.
    prctl(PR_SET_DUMPABLE, 0)
    # Orphans of the run (a double fork, a setsid daemon) become the tracker's children, not
    # init's, so the tracker can find and kill them when the run ends.
    prctl(_PR_SET_CHILD_SUBREAPER, 1)
    layers.append("process_tracking")
    return layers, missing


def _setup_run(config: dict[str, Any], layers: list[str], missing: list[str], landlock: Any) -> None:
    """The layers of the process that runs the code, applied after the tracker forked it: its own
    process group, Landlock, the seccomp filter, the audit hook. Then the report to the caller."""
    tracker = os.getppid()
    os.setpgid(0, 0)  # the run's group: kill(0) and killpg reach the run, never the tracker
    prctl(_PR_SET_PDEATHSIG, _SIGKILL)
    if os.getppid() != tracker:
        os._exit(137)
    scratch: str = config["scratch"]
    if config["landlock"]:
        try:
            read, read_write = _landlock_paths(scratch)
            landlock.restrict_self(read, read_write)
            layers.append("landlock")
        except OSError as exc:
            missing.append(f"landlock ({exc.strerror or exc})")
    if config["seccomp"]:
        template: bytes | None = config["seccomp_template"]
        try:
            if template is None:
                raise OSError(errno.ENOSYS, config["seccomp_unavailable"])
            load_seccomp_program(seccomp_program_for(template, os.getpid()))
            layers.append("seccomp")
        except OSError as exc:
            missing.append(f"seccomp ({exc.strerror or exc})")
    if config["audit_hook"]:
        _install_audit_hook(scratch)
        layers.append("audit_hook")

    if config["strict"] and missing:
        raise OSError(errno.EPERM, "strict isolation: unavailable layers: " + "; ".join(missing))
    control_fd = config["control_fd"]
    _report(control_fd, [f"layer {name}" for name in layers] + [f"missing {why}" for why in missing])
    os.close(control_fd)


def _children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:  # no CONFIG_PROC_CHILDREN: scan /proc for the parent pid
        children = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    with open(f"{entry.path}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                            children.append(int(entry.name))
                except (OSError, ValueError, IndexError):
                    pass
        return children


def _reap_all() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def _sweep(run_pid: int) -> tuple[int, bool]:
    """Kill every process left of the run. As the subreaper the tracker inherits every orphan, so
    its children are all that is left; each round kills them, and the orphans of the killed become
    its children for the next round. RLIMIT_NPROC bounds how many rounds a fork loop can force.
    Returns how many processes were killed and whether none is left."""
    me = os.getpid()
    try:
        os.killpg(run_pid, _SIGKILL)
    except OSError:
        pass
    killed: set[int] = set()
    for _ in range(1000):
        children = _children_of(me)
        if not children:
            _reap_all()
            return len(killed - {run_pid}), True
        for child in children:
            try:
                os.kill(child, _SIGKILL)
                killed.add(child)
            except OSError:
                pass
        time.sleep(0.001)
        _reap_all()
    _reap_all()
    return len(killed - {run_pid}), not _children_of(me)


class _Stop(Exception):
    """SIGTERM to the tracker: the caller's deadline passed."""


def _track(run_pid: int, control_fd: int) -> None:
    """The tracker's life after the fork: wait for the run, reaping orphans meanwhile; then kill
    whatever is left, tell the caller, and end the way the run's process ended."""

    def stop(signum: int, frame: Any) -> None:
        raise _Stop

    _signal.signal(_SIGTERM, stop)
    status: int | None = None
    try:
        while status is None:
            pid, wait_status = os.waitpid(-1, 0)
            if pid == run_pid:
                status = wait_status
    except _Stop:
        pass
    _signal.signal(_SIGTERM, _signal.SIG_IGN)
    killed, clean = _sweep(run_pid)
    if clean:
        try:
            _report(control_fd, [f"swept {killed}"])
        except OSError:
            pass
    if status is None:
        os._exit(128 + _SIGTERM)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:  # SIGKILL has no handler to reset
            _signal.signal(sig, _signal.SIG_DFL)
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # a signal whose default action does not end a process
    os._exit(os.waitstatus_to_exitcode(status))


def _run_user_code(code: bytes) -> None:
    source = code.decode("utf-8", errors="replace")
    main = type(sys)("__main__")
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main
    sys.argv = [CODE_FILENAME]
    try:
        exec(compile(source, CODE_FILENAME, "exec"), main.__dict__)
    except BaseException:
        # Tracebacks then quote the failing line, which helps the LLM that wrote it (linecache is
        # imported only now: it pulls in tokenize and re, too much for every run).
        import linecache

        linecache.cache[CODE_FILENAME] = (len(source), None, source.splitlines(True), CODE_FILENAME)
        raise


def _exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, MemoryError):
        return EXIT_MEMORY
    if isinstance(exc, SandboxViolation):
        return EXIT_BLOCKED
    if isinstance(exc, BlockingIOError) or (
        isinstance(exc, RuntimeError) and "can't start new thread" in str(exc)
    ):
        return EXIT_PROCESS
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return EXIT_FILE
    return 1


def _format_without_sandbox_frames(exc: BaseException) -> list[str]:
    """The traceback minus the bootstrap's and the audit hook's frames: the LLM that wrote the
    code needs its own frames, not ours."""
    import traceback

    ours = {os.path.realpath(__file__), "<string>"}  # this module and the ``-c`` line that starts it
    formatted = traceback.TracebackException.from_exception(exc)
    seen: set[int] = set()
    pending = [formatted]
    while pending:
        te = pending.pop()
        if id(te) in seen:
            continue
        seen.add(id(te))
        frames = list(te.stack)
        while frames and frames[0].filename in ours:  # the bootstrap: always the outermost frames
            del frames[0]
        te.stack = traceback.StackSummary.from_list(
            [frame for frame in frames if os.path.realpath(frame.filename) not in ours])
        pending += [c for c in (te.__cause__, te.__context__) if c is not None]
    return list(formatted.format())


def _read_stdin() -> bytes:
    chunks = []
    while chunk := os.read(0, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def command(python: str) -> list[str]:
    """The command line that starts the bootstrap with ``python``: no site, no user site, no
    environment variables, no bytecode writes; this folder on the path only while it imports."""
    here = os.path.dirname(os.path.realpath(__file__))
    line = f"import sys; sys.path.insert(0, {here!r}); import child; child.main()"
    return [python, "-I", "-S", "-B", "-c", line]


def main() -> None:
    """The bootstrap: read the settings and the code from stdin, apply the layers, run the code."""
    here = os.path.dirname(os.path.realpath(__file__))
    try:
        config = marshal.loads(_read_stdin())
        landlock: Any = None
        if config["landlock"]:  # beside this file, so imported while this folder is on the path
            import landlock as landlock_module

            landlock = landlock_module
        # The code sees the interpreter's own paths plus its site-packages, not this folder.
        sys.path[:] = [p for p in sys.path if p != here] + config["site_paths"]
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        # Line-buffered, so a run killed at the deadline still shows what it printed so far.
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, io.TextIOWrapper):
                stream.reconfigure(line_buffering=True)
        layers, missing = _setup_tracker(config)
        run_pid = os.fork()
    except BaseException as exc:
        print(f"sandbox setup failed: {exc}", file=sys.stderr, flush=True)
        os._exit(EXIT_SETUP)
    if run_pid:
        devnull = os.open(os.devnull, os.O_WRONLY)  # only the run holds the output pipes
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        _track(run_pid, config["control_fd"])
    try:
        _setup_run(config, layers, missing, landlock)
    except BaseException as exc:
        print(f"sandbox setup failed: {exc}", file=sys.stderr, flush=True)
        os._exit(EXIT_SETUP)
    try:
        _run_user_code(config["code"])
    except SystemExit:
        raise
    except BaseException as exc:
        status = _exit_code_for(exc)
        try:
            print("".join(_format_without_sandbox_frames(exc)), end="", file=sys.stderr)
        except BaseException:
            pass
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        os._exit(status)
