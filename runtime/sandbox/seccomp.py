"""The sandbox's seccomp filter: the system calls untrusted code may make, and with which arguments.

Why this layer: as the pod's own uid the code shares its uid with the sandbox server, so the
kernel's permission checks allow it to signal the server, trace it, read its memory and reach any
listener on loopback (in a local run: the learner, MLflow, S3). A seccomp-bpf filter (allowed
without privileges once no_new_privs is set, inherited by every child, impossible to remove)
refuses those calls at syscall entry, before any other check, whatever path led to them (Python,
ctypes, ``_posixsubprocess``, a C extension). What it stops:

- ``socket`` for every family but AF_UNIX, and AF_UNIX datagram sockets (their ``sendto`` can name
  any socket path, ``/dev/log`` for one); ``connect`` altogether, so an AF_UNIX stream socket can
  only be one end of a ``socketpair`` (asyncio and multiprocessing pipes keep working);
- ``kill``, ``tgkill``, ``rt_sigqueueinfo`` and ``rt_tgsigqueueinfo`` except to the run's own
  process group (pid 0, the run's pid and its negation); ``tkill``, ``pidfd_send_signal``;
- ``ptrace``, ``process_vm_readv``/``writev``, ``process_madvise``, ``pidfd_getfd``: no reading or
  changing another process;
- ``execve``/``execveat``: the run cannot start a fresh interpreter without the audit hook;
- ``mount`` and the new mount API, ``unshare``/``setns`` and namespace flags in ``clone`` (user
  namespaces are a large kernel surface and would hand the code capabilities inside them);
  ``clone3`` answers ENOSYS so that the C library falls back to ``clone``, whose flags are visible;
- ``keyctl``/``add_key``/``request_key``, ``bpf``, ``perf_event_open``, ``userfaultfd``,
  ``io_uring_*`` (io_uring performs socket and file operations without passing the filter);
- every system call libseccomp does not know for this architecture answers ENOSYS, so a call added
  to a newer kernel is refused rather than allowed by default.

Refused calls fail with EPERM (EAFNOSUPPORT for the socket families), so Python raises an OSError
the code can handle; the process is never killed by the filter. The filter is built with
libseccomp through ``pyseccomp`` (ctypes over the system's ``libseccomp.so.2``, API-compatible
with libseccomp's own Python module).

Built once, loaded every run: building the filter walks libseccomp's whole syscall table (tens of
milliseconds), so the caller exports the BPF program once (``program_template``), for a
placeholder pid, and every run's child puts its own pid in and loads the bytes with
``prctl(PR_SET_SECCOMP)`` (``child.seccomp_program_for`` and ``load_seccomp_program``):
the child never imports libseccomp.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from flowlane.runtime.sandbox.child import SECCOMP_PID_PLACEHOLDER

__all__ = ["FILTER_ERRNOS", "build_filter", "export_program", "load_binding", "program_template"]

#: The errors a refused call returns (how the escape suite tells this layer's refusals apart).
FILTER_ERRNOS = frozenset({errno.EPERM, errno.EAFNOSUPPORT, errno.ENOSYS})

_REFUSED = (
    "tkill", "pidfd_send_signal",
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "pidfd_getfd",
    "execve", "execveat", "connect",
    "mount", "umount2", "mount_setattr", "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig",
    "fspick", "pivot_root", "chroot", "unshare", "setns",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "name_to_handle_at", "open_by_handle_at", "quotactl", "swapon", "swapoff", "reboot", "acct",
)
_NOT_IMPLEMENTED = ("clone3",)
# Signals: refused unless the first argument names the run's own process or process group.
_SIGNAL_CALLS = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")
_CLONE_NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
_SOCK_TYPE_MASK = 0xF
_LIBRARIES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}


@contextmanager
def _known_libraries() -> Iterator[None]:
    """``ctypes.util.find_library`` without its ``ldconfig`` subprocess, for the two sonames pyseccomp
    looks up at import (that subprocess alone costs tens of milliseconds per run)."""
    original = ctypes.util.find_library
    ctypes.util.find_library = lambda name: _LIBRARIES.get(name) or original(name)
    try:
        yield
    finally:
        ctypes.util.find_library = original


def load_binding() -> ModuleType:
    """The libseccomp binding: libseccomp's own module where installed, else pyseccomp."""
    try:
        import seccomp  # Debian's python3-seccomp, when the interpreter sees it

        return seccomp
    except ImportError:
        pass
    with _known_libraries():
        import pyseccomp

        return pyseccomp


def _signed_forms(value: int) -> set[int]:
    """A negative pid as the 64-bit register may carry it: sign- or zero-extended from 32 bits.
    Allowing both is safe: every other value is refused."""
    return {value & 0xFFFFFFFF, value & 0xFFFFFFFFFFFFFFFF}


def build_filter(run_pid: int) -> Any:
    """The filter (a libseccomp ``SyscallFilter``) for a run whose process, the leader of the run's
    process group, is ``run_pid``."""
    sc = load_binding()
    arch = sc.system_arch()
    # Refused by default: every call not allowed below, including those libseccomp does not know.
    flt = sc.SyscallFilter(sc.ERRNO(errno.EPERM))
    with_arguments = {"socket", "socketpair", "clone", *_SIGNAL_CALLS}
    refused = set(_REFUSED) | set(_NOT_IMPLEMENTED) | with_arguments
    for number in range(0, 1024):
        try:
            name = sc.resolve_syscall(arch, number)
        except (ValueError, OSError):
            continue
        name = name.decode() if isinstance(name, bytes) else name
        if name and name not in refused:
            flt.add_rule(sc.ALLOW, number)
    # A rule without arguments would override these (libseccomp), so each call with argument
    # checks gets only allow rules: whatever they do not match is refused.
    for value in {0} | _signed_forms(run_pid) | _signed_forms(-run_pid):
        flt.add_rule(sc.ALLOW, "kill", sc.Arg(0, sc.EQ, value))
    for name in ("tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        flt.add_rule(sc.ALLOW, name, sc.Arg(0, sc.EQ, run_pid))
    for name in ("socket", "socketpair"):
        for kind in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET):
            flt.add_rule(sc.ALLOW, name, sc.Arg(0, sc.EQ, socket.AF_UNIX),
                         sc.Arg(1, sc.MASKED_EQ, _SOCK_TYPE_MASK, kind))
    flt.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), "socket", sc.Arg(0, sc.NE, socket.AF_UNIX))
    flt.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, sum(_CLONE_NAMESPACE_FLAGS), 0))
    for name in _NOT_IMPLEMENTED:
        flt.add_rule(sc.ERRNO(errno.ENOSYS), name)
    return flt


def export_program(run_pid: int) -> bytes:
    """The BPF program libseccomp builds for ``run_pid`` (``struct sock_filter`` array, native
    byte order): exactly what loading the filter would install."""
    fd = os.memfd_create("flowlane-seccomp-bpf", os.MFD_CLOEXEC)
    with open(fd, "w+b") as out:
        build_filter(run_pid).export_bpf(out)
        out.seek(0)
        return out.read()


@functools.cache
def program_template() -> bytes:
    """The program for the placeholder pid, built once per process; raises ImportError or OSError
    when libseccomp is not there."""
    return export_program(SECCOMP_PID_PLACEHOLDER)


