"""The gateway's sandbox server child dies with the gateway, even when the gateway is SIGKILLed.

Real processes, no mocks: a parent python process starts a ``SandboxChild`` exactly as
``flowlane serve`` does, reports the child's pid, and is killed with SIGKILL (no clean-up runs);
the child must be gone within a few seconds instead of living on as init's orphan.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowlane.runtime.serving.sandbox import CHILD_MODULE, PARENT_PID_FLAG

#: The gateway's part, as `flowlane serve` plays it: start the child, then serve until killed.
PARENT_SCRIPT = """
import asyncio

from flowlane.runtime.serving.sandbox import SandboxChild


async def main() -> None:
    child = SandboxChild(max_concurrency=1)
    await child.start()
    result = await child.run("print(6 * 7)")
    print(child.pid, result.stdout.strip(), flush=True)
    await asyncio.sleep(3600)


asyncio.run(main())
"""
START_TIMEOUT_S = 90.0
DEATH_TIMEOUT_S = 5.0


def process_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` from /proc (``Z`` for a zombie), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rpartition(")")[2].split()[0]


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def alive(pid: int) -> bool:
    state = process_state(pid)
    return state is not None and state != "Z"


def read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        raise AssertionError(f"the parent printed nothing within {timeout_s:g} s")
    return proc.stdout.readline()


def test_the_sandbox_child_dies_when_its_gateway_is_sigkilled(tmp_path: Path) -> None:
    log = tmp_path / "parent.log"
    with log.open("w") as stderr:
        parent = subprocess.Popen([sys.executable, "-c", PARENT_SCRIPT], stdout=subprocess.PIPE,
                                  stderr=stderr, text=True)
    child_pid = None
    try:
        line = read_line(parent, START_TIMEOUT_S)
        assert line, f"the parent exited with {parent.wait()}: {log.read_text()[-2000:]}"
        pid_text, answer = line.split()
        child_pid = int(pid_text)
        assert answer == "42"  # the child is a working sandbox server, not a stub
        assert alive(child_pid) and parent_of(child_pid) == parent.pid
        assert CHILD_MODULE in Path(f"/proc/{child_pid}/cmdline").read_text()

        parent.send_signal(signal.SIGKILL)
        assert parent.wait(timeout=10) == -signal.SIGKILL
        deadline = time.monotonic() + DEATH_TIMEOUT_S
        while alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child_pid), f"the sandbox child {child_pid} outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child_pid is not None and alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def test_a_sandbox_child_whose_parent_is_already_gone_exits_before_serving() -> None:
    """The race the parent-pid check closes: a parent dead before the death signal was armed."""
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that is certainly not the child's parent
    result = subprocess.run([sys.executable, "-m", CHILD_MODULE, PARENT_PID_FLAG, str(gone.pid),
                             "--host", "127.0.0.1", "--port", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"its parent {gone.pid} exited before the child started" in result.stderr
    assert "serving on" not in result.stdout


@pytest.mark.parametrize("argv", [[], ["--port", "0"], [PARENT_PID_FLAG, "x"]])
def test_the_sandbox_child_refuses_to_start_without_a_parent_pid(argv: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", CHILD_MODULE, *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"usage: python -m {CHILD_MODULE} {PARENT_PID_FLAG} PID" in result.stderr
