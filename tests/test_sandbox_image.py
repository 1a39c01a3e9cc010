"""The sandbox escape suite inside the built sandbox image, as the pod's own user with its restrictions.

The operator renders sandbox pods as uid 10001 with every capability dropped, a read-only root
file system, no_new_privs, the runtime's default seccomp profile and a size-capped ``/tmp``. This
runs ``tests/sandbox_escapes.py`` (the cases ``tests/test_sandbox.py`` runs as root and as an
unprivileged uid on the host) in the image under exactly those settings, so the layers are proven
where model-written code really runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from node_agent import podman
from one_machine_cluster import IMAGES

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

CASES = Path(__file__).resolve().parent / "sandbox_escapes.py"


def test_every_escape_fails_in_the_sandbox_image_as_uid_10001_with_the_pods_restrictions(built_images: None) -> None:
    result = podman("run", "--rm", "--user", "10001:10001", "--read-only", "--read-only-tmpfs=false",
                    "--cap-drop", "all", "--security-opt", "no-new-privileges", "--shm-size", "64m",
                    "--mount", "type=tmpfs,destination=/tmp,tmpfs-mode=1777,tmpfs-size=268435456",
                    "--volume", f"{CASES}:/cases/sandbox_escapes.py:ro", "--entrypoint", "python",
                    IMAGES["sandbox"], "/cases/sandbox_escapes.py", "--json", check=False, timeout=800)
    assert result.stdout, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["uid"] == 10001
    escaped = [r for r in report["results"] if not r["held"] or r["problems"]]
    assert escaped == [], json.dumps(escaped, indent=1)
    wrong_layer = {r["name"]: (r["stopped_by"], r["expected"]) for r in report["results"]
                   if r["stopped_by"] != r["expected"]}
    assert wrong_layer == {}
    assert len(report["results"]) >= 30
    assert result.returncode == 0, result.stderr[-3000:]
