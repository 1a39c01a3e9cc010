"""A torchrun rank ends with its launcher (``flowlane.kit.lifetime``).

torchrun starts every rank in a session of its own, so killing the launcher's process group
leaves the ranks running. Here a launcher stand-in starts a child the way torchrun does
(``start_new_session=True``); the child ties its lifetime to the launcher, and the launcher is
killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

CHILD = textwrap.dedent("""
    import os, sys, time
    from flowlane.kit.lifetime import die_with_parent
    if sys.argv[1] == "tied":
        die_with_parent(os.getppid())
    print("ready", flush=True)
    time.sleep(120)
""")

LAUNCHER = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], start_new_session=True,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    print(child.pid, flush=True)
    time.sleep(120)
""")


def child_of_killed_launcher(mode: str) -> psutil.Process:
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, CHILD, mode], stdout=subprocess.PIPE, text=True,
                                start_new_session=True)
    assert launcher.stdout is not None
    child = psutil.Process(int(launcher.stdout.readline()))
    os.killpg(launcher.pid, signal.SIGKILL)  # what the supervisor does to a learner pod's group
    launcher.wait(timeout=10)
    return child


def gone_within(process: psutil.Process, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not process.is_running() or process.status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


def test_a_rank_tied_to_its_launcher_dies_when_the_launchers_group_is_killed() -> None:
    assert gone_within(child_of_killed_launcher("tied"), 5)


def test_without_the_tie_the_rank_outlives_its_killed_launcher() -> None:
    """The reason for the tie: the killed group does not hold the rank, which keeps running."""
    child = child_of_killed_launcher("free")
    try:
        assert not gone_within(child, 1)
    finally:
        child.kill()
