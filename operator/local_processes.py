"""Process groups of a local run: dying with the supervisor, signalling a group, probing readiness.

Every component is its own session; ``child_preexec`` makes it die with the supervisor
(``PR_SET_PDEATHSIG``), and the :class:`Watchdog` (this module run as
``python -m flowlane.operator.local_processes --watchdog``) kills every registered group,
grandchildren included, when the supervisor disappears by any means.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable

from flowlane.kit.lifetime import die_with_parent
from flowlane.operator.local_plan import LOOPBACK


def child_preexec(parent_pid: int) -> Callable[[], None]:
    """Runs in the forked child before exec: die with the supervisor, even by SIGKILL."""

    def preexec() -> None:
        die_with_parent(parent_pid)  # also exits if the supervisor died between fork and this call

    return preexec


def signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to a process group; False when no process is left in it."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def probe_tcp(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(LOOPBACK, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def probe_grpc(port: int, timeout_s: float) -> bool:
    from flowlane.kit.grpc_common import wait_for_channel

    return await wait_for_channel(f"{LOOPBACK}:{port}", timeout_s)


class Watchdog:
    """A helper process that kills registered process groups when the supervisor disappears.

    It reads ``+<pgid>`` / ``-<pgid>`` lines on stdin; end of input (the supervisor exited, by
    any means) makes it SIGKILL every group still registered, then exit.
    """

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "flowlane.operator.local_processes", "--watchdog",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
        )

    def _send(self, line: str) -> None:
        if self._proc is not None and self._proc.stdin is not None and not self._proc.stdin.is_closing():
            self._proc.stdin.write(line.encode())

    def register(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def forget(self, pgid: int) -> None:
        self._send(f"-{pgid}\n")

    async def close(self) -> None:
        if self._proc is None:
            return
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), 5)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()
        self._proc = None


def watchdog_main() -> None:
    """Entry point of the watchdog process (``python -m flowlane.operator.local_processes --watchdog``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups: set[int] = set()
    for line in sys.stdin:
        line = line.strip()
        if line.startswith("+"):
            groups.add(int(line[1:]))
        elif line.startswith("-"):
            groups.discard(int(line[1:]))
    for pgid in groups:
        signal_group(pgid, signal.SIGKILL)


if __name__ == "__main__":
    if sys.argv[1:] == ["--watchdog"]:
        watchdog_main()
    else:
        sys.exit("usage: python -m flowlane.operator.local_processes --watchdog (started by LocalSupervisor)")
