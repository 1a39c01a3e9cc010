"""The processes of a run: its per-run uid, waiting for its exit, and killing everything it left.

A run's code may fork, leave its process group or outlive the run; these are the caller's means of
making sure nothing of it is left (see ``runner``'s module docstring for the tracker and the uid drop).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import signal
import tempfile
from pathlib import Path

# Per-run uids come from this range (inside 16 bits so that user-namespaced containers, which
# usually map only 0..65535, can still switch to them). Lock files keep concurrent callers, in
# this process or others, from sharing one.
_UID_RANGE = range(40000, 60000)
_UID_LOCK_DIR = Path(tempfile.gettempdir()) / "flowlane-sandbox-uids"
_UID_PICKER = random.SystemRandom()  # never touches (or depends on) the seeded global RNG


class UidLease:
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


def running_pids_of_uid(uid: int) -> list[int]:
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


async def kill_all_of_uid(uid: int) -> int:
    """Kill every process of ``uid``; returns how many were alive at the first look.

    ``kill -KILL -1`` sent by a helper shell running as that uid reaches all of its processes in one
    atomic sweep (no pid-reuse race, no fork race); a few rounds cover processes that were still
    being created.
    """
    first = len(running_pids_of_uid(uid))
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
        alive = len(running_pids_of_uid(uid))
    return first


def exit_of(pid: int) -> asyncio.Future[None]:
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


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def stop_tracker(proc: asyncio.subprocess.Process) -> None:
    """Ask the run's tracker to kill every process of the run (SIGTERM), then kill its group."""
    exited = exit_of(proc.pid)  # a fresh one: the deadline cancelled the first
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(exited, timeout=2)
    except TimeoutError:
        pass
    finally:
        exited.cancel()
    kill_group(proc.pid)
