"""Landlock for the code sandbox: a run may write only its scratch directory and read only what the
interpreter needs.

Why this layer: the pod's uid owns the sandbox server, its mounted token file and everything else
the pod writes, so file permissions cannot tell the server's files from the code's. Landlock
(Linux 5.13+, no privileges needed, only no_new_privs) lets the process that is about to run the
code drop, for itself and every process it starts, the right to touch any file outside a few
directory trees. What it stops:

- writes, renames, links, symlinks, fifos, sockets and deletes outside the scratch directory,
  whatever path, ``dir_fd`` or C extension they come through (the kernel resolves the path);
- reads outside the interpreter, its libraries and the scratch directory: another run's scratch,
  the token file, ``/proc/<pid>/environ`` of the server, the checkout;
- ``execve`` of anything (no tree is given the execute right);
- TCP ``connect``/``bind`` (ABI 4+; seccomp already refuses to create the socket);
- signals to, and abstract UNIX sockets of, processes outside the run (ABI 6+ scopes: the run's
  domain is its own, so the server and other runs are outside it).

Why a ctypes wrapper and not a PyPI binding: the one published binding (``landlock``) is an alpha
that handles filesystem rights only, with no network rules and no scopes, and no way to drop the
rights an older kernel does not know. Three syscalls and two structs are all there is to it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

TYPE_CHECKING = False  # the sandbox child imports this module on every run: no typing import
if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["LandlockUnavailable", "abi_version", "restrict_self"]

# x86_64 and aarch64 share these numbers (the syscall table was unified from 5.x on).
_SYS_CREATE_RULESET = 444
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1

# Filesystem rights, by the ABI version that introduced them.
FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2: linking/renaming across directories
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}
_FS_ALL = (1 << 16) - 1
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1

_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
READ = FS_READ_FILE | FS_READ_DIR
#: Everything in the scratch directory but execute (and device nodes, which need CAP_MKNOD anyway).
READ_WRITE = _FS_ALL & ~(FS_EXECUTE | FS_MAKE_CHAR | FS_MAKE_BLOCK | FS_IOCTL_DEV)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the kernel struct is __attribute__((packed))
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class LandlockUnavailable(OSError):
    """The kernel has no Landlock, or it is disabled (not in the ``lsm=`` boot list)."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(number: int, *args: object) -> int:
    result = int(_libc.syscall(number, *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def abi_version() -> int:
    """The Landlock ABI the kernel offers (0: none)."""
    try:
        return _syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
            return 0
        raise


def restrict_self(read: Iterable[str], read_write: Iterable[str]) -> int:
    """Confine this process and its future children; returns the ABI version used.

    Each path is a directory tree or a single file (a file's rule keeps only the file rights).
    Paths that do not exist are skipped. The caller must have set no_new_privs. Raises
    ``LandlockUnavailable`` when the kernel has no Landlock.
    """
    abi = abi_version()
    if abi < 1:
        raise LandlockUnavailable(errno.EOPNOTSUPP, "Landlock is not available in this kernel")
    handled_fs = _FS_BY_ABI.get(abi, _FS_ALL)
    attr = _RulesetAttr(handled_fs, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
                        SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24  # older kernels refuse fields they do not know
    ruleset = _syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    try:
        for path, rights in [(p, READ) for p in read] + [(p, READ_WRITE) for p in read_write]:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    rights &= _FILE_RIGHTS
                rule = _PathBeneathAttr(rights & handled_fs, fd)
                _syscall(_SYS_ADD_RULE, ruleset, ctypes.c_int(_RULE_PATH_BENEATH), ctypes.byref(rule),
                         ctypes.c_uint32(0))
            finally:
                os.close(fd)
        _syscall(_SYS_RESTRICT_SELF, ruleset, ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    return abi
