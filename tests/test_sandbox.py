"""The code sandbox: every limit holds, each isolation layer holds on its own, the caller survives.

These run real subprocesses under the real kernel limits. The machine this runs on (Linux, root)
supports every isolation layer; the first test fails loudly where one cannot be enforced.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import shutil
import site
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from flowlane.api.errors import ConfigError
from flowlane.runtime.sandbox import child, seccomp
from flowlane.runtime.sandbox.layers import Isolation, IsolationLayer, missing_mandatory_layers
from flowlane.runtime.sandbox.limits import SandboxLimits
from flowlane.runtime.sandbox.result import SandboxErrorKind, SandboxResult
from flowlane.runtime.sandbox.runner import CodeRunner, LocalCodeRunner, probe_isolation, run_python

sys.path.insert(0, str(Path(__file__).parent))
import sandbox_escapes  # a plain module beside the tests, also run on its own

FAST = SandboxLimits(cpu_time_s=2, wall_time_s=10)


def processes_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if fields["Uid"].split()[0] == str(uid) and not fields["State"].strip().startswith("Z"):
                pids.append(int(entry.name))
    return pids


async def test_every_isolation_layer_is_enforced_on_this_machine() -> None:
    # The test process is dumpable (the sandbox server is not: see test_sandbox_server.py).
    assert set(await probe_isolation()) == set(IsolationLayer) - {IsolationLayer.NON_DUMPABLE_CALLER}


def test_a_non_dumpable_caller_is_reported_as_a_layer_and_nothing_mandatory_is_missing() -> None:
    code = (
        "import asyncio\n"
        "from flowlane.runtime.sandbox.layers import make_non_dumpable, missing_mandatory_layers\n"
        "from flowlane.runtime.sandbox.runner import probe_isolation\n"
        "make_non_dumpable()\n"
        "print(missing_mandatory_layers(asyncio.run(probe_isolation())))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "[]\n"), done.stderr


def test_missing_mandatory_layers_are_named() -> None:
    layers = (IsolationLayer.RLIMITS, IsolationLayer.NO_NEW_PRIVS, IsolationLayer.PROCESS_TRACKING)
    assert missing_mandatory_layers(layers, as_root=True) == [
        "landlock", "non_dumpable_caller", "seccomp", "unprivileged_uid"]


@pytest.mark.parametrize("run_pid", [1, 4242, 4_194_303])
def test_the_seccomp_template_with_a_pid_put_in_is_what_libseccomp_builds_for_that_pid(run_pid: int) -> None:
    template = seccomp.program_template()
    assert child.seccomp_program_for(template, run_pid) == seccomp.export_program(run_pid)


async def test_the_child_imports_neither_flowlane_nor_site_nor_heavy_stdlib_modules() -> None:
    result = await run_python("import sys\nprint(sorted(sys.modules))", FAST)
    loaded = set(ast.literal_eval(result.stdout))
    assert loaded & {"site", "re", "enum", "typing", "json", "asyncio", "linecache", "contextlib"} == set()
    assert [name for name in loaded if name.startswith("flowlane")] == []


async def test_the_child_imports_from_the_interpreters_site_packages_but_not_the_sandbox_folder() -> None:
    result = await run_python("import sys\nprint('\\n'.join(sys.path))", FAST)
    paths = result.stdout.split()
    assert set(site.getsitepackages()) & set(os.path.realpath(p) for p in paths)
    assert str(Path(child.__file__).resolve().parent) not in paths


async def test_normal_code_prints_its_result() -> None:
    result = await run_python("print(6 * 7)", FAST)
    assert (result.ok, result.exit_code, result.error_kind, result.stdout) == (True, 0, None, "42\n")
    assert not result.truncated


async def test_exception_is_an_error_whose_traceback_shows_only_the_code() -> None:
    result = await run_python("def f():\n    return 1 / 0\nf()", FAST)
    assert (result.ok, result.error_kind, result.exit_code) == (False, SandboxErrorKind.ERROR, 1)
    assert result.message == "error: exit code 1: ZeroDivisionError: division by zero"
    assert 'File "<code>", line 2, in f' in result.stderr
    assert "return 1 / 0" in result.stderr
    assert "child.py" not in result.stderr  # none of the bootstrap's frames


async def test_infinite_loop_is_stopped_by_the_cpu_limit() -> None:
    # The kind is the check: the wall clock (30 s) would report TIMEOUT. The duration bound is loose
    # because 1 s of CPU can take many seconds of wall time on a loaded 2-core machine.
    result = await run_python("while True:\n    pass", SandboxLimits(cpu_time_s=1, wall_time_s=30))
    assert result.error_kind is SandboxErrorKind.CPU_LIMIT
    assert result.duration_s < 25


async def test_sleeping_code_is_stopped_by_the_wall_clock() -> None:
    result = await run_python("import time\ntime.sleep(60)", SandboxLimits(wall_time_s=1))
    assert result.error_kind is SandboxErrorKind.TIMEOUT
    assert result.message == "timeout: wall-clock limit of 1s"
    assert result.duration_s < 5


async def test_output_printed_before_the_deadline_is_kept() -> None:
    result = await run_python("import time\nprint('started')\ntime.sleep(60)", SandboxLimits(wall_time_s=3))
    assert (result.error_kind, result.stdout) == (SandboxErrorKind.TIMEOUT, "started\n")


async def test_memory_hog_hits_the_memory_limit() -> None:
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(10_000_000))"
    result = await run_python(code, SandboxLimits(memory_bytes=128 * 1024 * 1024))
    assert result.error_kind is SandboxErrorKind.MEMORY_LIMIT
    assert result.message == "memory_limit: memory limit of 128 MiB"


async def test_fork_bomb_hits_the_process_limit_and_leaves_no_process() -> None:
    result = await run_python("import os\nwhile True:\n    os.fork()", SandboxLimits(max_processes=16))
    assert result.error_kind is SandboxErrorKind.PROCESS_LIMIT
    assert result.sandbox_uid is not None
    assert processes_of_uid(result.sandbox_uid) == []


async def test_fork_bomb_that_ignores_failures_is_killed_at_the_deadline_with_all_its_processes() -> None:
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = await run_python(code, SandboxLimits(max_processes=16, wall_time_s=2))
    assert result.error_kind is SandboxErrorKind.TIMEOUT
    assert processes_of_uid(result.sandbox_uid or -1) == []


async def test_process_that_leaves_the_process_group_is_still_killed() -> None:
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    time.sleep(60)\n"
        "print('parent done')"
    )
    result = await run_python(code, FAST)
    assert (result.ok, result.stdout) == (True, "parent done\n")
    assert result.duration_s < 5
    assert result.details["leftover_processes_killed"] == 1  # by the tracker's sweep
    assert processes_of_uid(result.sandbox_uid or -1) == []


async def test_thread_creation_is_bounded_by_the_process_limit() -> None:
    code = (
        "import threading, time\n"
        "for _ in range(100):\n"
        "    threading.Thread(target=time.sleep, args=(5,), daemon=True).start()"
    )
    result = await run_python(code, SandboxLimits(max_processes=8))
    assert result.error_kind is SandboxErrorKind.PROCESS_LIMIT


async def test_writing_a_file_over_the_size_limit_fails() -> None:
    code = "with open('big.bin', 'wb') as f:\n    f.write(b'x' * 2_000_000)"
    result = await run_python(code, SandboxLimits(max_file_bytes=1_000_000))
    assert result.error_kind is SandboxErrorKind.FILE_LIMIT


async def test_writing_outside_the_scratch_directory_is_blocked() -> None:
    target = Path("/tmp") / f"flowlane-escape-{uuid.uuid4().hex}"
    result = await run_python(f"open({str(target)!r}, 'w').write('x')", FAST)
    assert result.error_kind is SandboxErrorKind.BLOCKED
    assert "outside the scratch directory" in result.message
    assert not target.exists()


async def test_a_symlink_out_of_the_scratch_directory_does_not_help() -> None:
    target = Path("/tmp") / f"flowlane-escape-{uuid.uuid4().hex}"
    result = await run_python(f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w')", FAST)
    assert result.error_kind is SandboxErrorKind.BLOCKED
    assert not target.exists()


async def test_without_the_audit_hook_and_landlock_writes_to_shared_tmp_never_reach_the_host() -> None:
    target = Path("/tmp") / f"flowlane-escape-{uuid.uuid4().hex}"
    code = f"open({str(target)!r}, 'w').write('x')\nprint(open({str(target)!r}).read())"
    result = await run_python(code, FAST, isolation=Isolation(audit_hook=False, landlock=False))
    assert (result.ok, result.stdout) == (True, "x\n")  # it wrote to the run's private tmpfs
    assert not target.exists()


async def test_without_the_audit_hook_and_landlock_root_owned_directories_are_not_writable(tmp_path: Path) -> None:
    # The real /tmp stays visible (no private_tmp), so this holds wherever the checkout lives.
    root_owned = tmp_path / "root-owned"
    root_owned.mkdir(mode=0o755)
    target = root_owned / f"flowlane-escape-{uuid.uuid4().hex}"
    try:
        result = await run_python(f"open({str(target)!r}, 'w')", FAST,
                                  isolation=Isolation(audit_hook=False, landlock=False, private_tmp=False))
        assert result.error_kind is SandboxErrorKind.ERROR
        assert "PermissionError" in result.message
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


async def test_files_inside_the_scratch_directory_can_be_written_and_read() -> None:
    code = "import os\nos.mkdir('d')\nopen('d/a.txt', 'w').write('hello')\nprint(open('d/a.txt').read())"
    result = await run_python(code, FAST)
    assert (result.ok, result.stdout) == (True, "hello\n")


async def test_scratch_directory_is_the_cwd_and_is_deleted_afterwards(tmp_path: Path) -> None:
    result = await run_python("import os\nprint(os.getcwd())", FAST, scratch_root=tmp_path)
    scratch = Path(result.stdout.strip())
    assert scratch.parent == tmp_path.resolve()
    assert not scratch.exists()


async def test_opening_a_socket_is_blocked() -> None:
    result = await run_python("import socket\nsocket.socket()", FAST)
    assert result.error_kind is SandboxErrorKind.BLOCKED
    assert result.message.endswith("networking is not allowed (the code runs offline, in its scratch dir)")


async def test_without_the_audit_hook_seccomp_and_landlock_the_network_namespace_still_reaches_nothing() -> None:
    connections = 0

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)"
        result = await run_python(code, FAST, isolation=Isolation(audit_hook=False, seccomp=False, landlock=False))
    finally:
        server.close()
        await server.wait_closed()
    assert result.error_kind is SandboxErrorKind.ERROR
    assert "Network is unreachable" in result.message
    assert connections == 0


async def test_huge_output_is_truncated_while_reading() -> None:
    code = "import sys\nfor _ in range(500):\n    sys.stdout.write('x' * 100_000)\nprint('done', file=sys.stderr)"
    result = await run_python(code, SandboxLimits(max_output_bytes=10_000))
    assert (result.ok, result.truncated) == (True, True)
    assert result.stdout == "x" * 10_000
    assert result.stderr == "done\n"


async def test_starting_a_process_is_blocked() -> None:
    result = await run_python("import os\nos.system('true')", FAST)
    assert result.error_kind is SandboxErrorKind.BLOCKED
    assert "os.system is not allowed" in result.message


async def test_calling_native_code_through_ctypes_is_blocked() -> None:
    result = await run_python("import ctypes\nctypes.CDLL(None).getpid()", FAST)
    assert result.error_kind is SandboxErrorKind.BLOCKED


async def test_code_cannot_kill_its_caller() -> None:
    result = await run_python("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", FAST)
    assert result.error_kind is SandboxErrorKind.ERROR
    assert "PermissionError" in result.message


async def test_code_runs_as_an_unprivileged_uid_without_capabilities() -> None:
    code = (
        "import os\n"
        "caps = [l for l in open('/proc/self/status') if l.startswith('CapEff')][0].split()[1]\n"
        "print(os.getuid(), os.getgid(), os.getgroups(), caps)"
    )
    result = await run_python(code, FAST, isolation=Isolation(landlock=False))  # Landlock hides /proc
    uid = result.sandbox_uid
    assert uid is not None and uid != 0
    assert result.stdout == f"{uid} {uid} [] 0000000000000000\n"


async def test_caller_environment_is_not_inherited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWLANE_TEST_SECRET", "hunter2")
    result = await run_python("import os\nprint(os.environ.get('FLOWLANE_TEST_SECRET'))", FAST)
    assert result.stdout == "None\n"


async def test_scientific_libraries_import_inside_the_sandbox() -> None:
    result = await run_python("import numpy\nprint(int(numpy.arange(5).sum()))", SandboxLimits(wall_time_s=30))
    assert (result.ok, result.stdout) == (True, "10\n")


async def test_concurrent_runs_get_distinct_uids() -> None:
    results = await asyncio.gather(*(run_python("import os\nprint(os.getuid())", FAST) for _ in range(3)))
    assert len({r.stdout for r in results}) == 3


async def test_local_code_runner_implements_the_code_runner_protocol() -> None:
    runner = LocalCodeRunner(FAST)
    assert isinstance(runner, CodeRunner)
    result = await runner.run("print('hi')")
    assert (result.ok, result.stdout) == (True, "hi\n")


def test_result_round_trips_through_a_dict() -> None:
    result = SandboxResult(
        "out", "err", -24, False, SandboxErrorKind.CPU_LIMIT, "cpu_limit", True, 1.5,
        (IsolationLayer.RLIMITS, IsolationLayer.AUDIT_HOOK), 41000, {"leftover_processes_killed": 2},
    )  # fmt: skip
    assert SandboxResult.from_dict(result.to_dict()) == result


def test_invalid_limits_name_the_field() -> None:
    with pytest.raises(ConfigError, match="sandbox limits: wall_time_s must be > 0, got 0"):
        SandboxLimits(wall_time_s=0)


def test_caller_is_still_root_after_all_runs() -> None:
    # The sandbox drops privileges only in its children.
    assert os.geteuid() == 0


# --- the escape suite (tests/sandbox_escapes.py), as root and as the pod's uid -------------------

ESCAPE_NAMES = [case.name for case in sandbox_escapes.ESCAPES]
POD_UID = 10001


def _reachable_for_other_users(paths: list[str]) -> str:
    """Shell lines that, in a private mount namespace, make ``paths`` reachable where an ancestor is
    closed to other users (pyenv under a 0700 /root): a tmpfs over the ancestor, the paths bound back."""
    lines: list[str] = []
    covers: dict[str, list[str]] = {}
    for path in paths:
        parts = Path(path).parts
        for i in range(2, len(parts)):
            ancestor = os.path.join(*parts[:i])
            if not os.stat(ancestor).st_mode & 0o001:
                covers.setdefault(ancestor, []).append(path)
                break
    for n, (ancestor, inside) in enumerate(covers.items()):
        for m, path in enumerate(inside):
            lines.append(f"k{n}_{m}=$(mktemp -d) && mount --bind {path} $k{n}_{m}")
        lines.append(f"mount -t tmpfs -o mode=0755,size=1m tmpfs {ancestor}")
        for m, path in enumerate(inside):
            lines.append(f"mkdir -p {path} && mount --bind $k{n}_{m} {path}")
    return "\n".join(lines)


def run_escapes_as_pod_user() -> dict[str, dict[str, Any]]:
    """The runner as uid 10001 with no capabilities and no_new_privs, as the pod runs it."""
    repo = str(Path(__file__).resolve().parent.parent)
    needed = sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, repo)})
    script = "set -e\n" + _reachable_for_other_users(needed) + (
        f"\nexec setpriv --reuid {POD_UID} --regid {POD_UID} --clear-groups --inh-caps=-all --bounding-set=-all "
        f"--no-new-privs env HOME=/tmp {sys.executable} {repo}/tests/sandbox_escapes.py --json\n")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=600, cwd="/")
    report = json.loads(done.stdout)
    assert report["uid"] == POD_UID
    return {r["name"]: r for r in report["results"]}


@pytest.fixture(scope="module")
def escapes_as_root() -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in asyncio.run(sandbox_escapes.run_escapes())}


@pytest.fixture(scope="module")
def escapes_as_pod_user() -> dict[str, dict[str, Any]]:
    if not (shutil.which("setpriv") and shutil.which("unshare")):
        pytest.fail("setpriv and unshare (util-linux) are needed to run the suite as the pod's uid")
    return run_escapes_as_pod_user()


@pytest.mark.parametrize("name", ESCAPE_NAMES)
def test_escape_is_stopped_as_root(name: str, escapes_as_root: dict[str, dict[str, Any]]) -> None:
    result = escapes_as_root[name]
    assert (result["held"], result["problems"]) == (True, [])
    assert result["stopped_by"] == result["expected"]


@pytest.mark.parametrize("name", ESCAPE_NAMES)
def test_escape_is_stopped_as_the_pod_uid_without_capabilities(
    name: str, escapes_as_pod_user: dict[str, dict[str, Any]]
) -> None:
    result = escapes_as_pod_user[name]
    assert (result["held"], result["problems"]) == (True, [])
    assert result["stopped_by"] == result["expected"]


def test_as_the_pod_uid_the_kernel_layers_stop_what_root_has_the_uid_drop_for(
    escapes_as_pod_user: dict[str, dict[str, Any]]
) -> None:
    stoppers = {name: escapes_as_pod_user[name]["stopped_by"] for name in (
        "read_the_servers_proc_environ", "read_a_dumpable_neighbours_proc_environ", "read_another_runs_scratch",
        "write_outside_scratch_with_open", "signal_the_server", "connect_to_loopback_tcp")}
    assert stoppers == {
        "read_the_servers_proc_environ": "non_dumpable_caller",
        "read_a_dumpable_neighbours_proc_environ": "landlock",
        "read_another_runs_scratch": "landlock",
        "write_outside_scratch_with_open": "landlock",
        "signal_the_server": "seccomp",
        "connect_to_loopback_tcp": "seccomp",
    }


async def test_a_run_killed_by_a_signal_is_reported_with_that_signal() -> None:
    result = await run_python("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", FAST)
    assert (result.error_kind, result.exit_code, result.message) == (
        SandboxErrorKind.KILLED, -9, "killed: by signal SIGKILL")
