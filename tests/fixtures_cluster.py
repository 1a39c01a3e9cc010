"""The one-machine cluster for the container tests: built images, the API emulator, the operator
image and the node agent (``one_machine_cluster``), started once per session.

The tests that use it carry the ``cluster`` marker, which selects them to run alone
(``pytest -m cluster``). They need a container engine: the fixture builds the images with
``scripts/build-images.sh``, which installs podman when it is missing (as root), so a clean
machine runs them with nothing installed by hand.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from node_agent import LABEL, podman
from one_machine_cluster import OneMachineCluster, build_images, one_machine_cluster


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cluster: runs images in containers on the one-machine cluster (podman)")


@pytest.fixture(scope="session")
def built_images() -> None:
    """Every image in images/ built (cached layers make a rebuild take seconds)."""
    started = time.monotonic()
    build_images()
    print(f"images ready in {time.monotonic() - started:.0f} s")


def remove_leftovers(prefix: str = "flowlane-test-") -> None:
    """Containers and networks of an earlier session that was killed before it could clean up."""
    names = podman("ps", "--all", "--filter", f"label={LABEL}=1", "--format", "{{.Names}}", check=False).stdout.split()
    stale = [n for n in names if n.startswith((prefix, "k8s_flowlane-e2e_"))]
    if stale:
        podman("rm", "--force", "--time", "0", *stale, check=False)
    stale_networks = [n for n in podman("network", "ls", "--format", "{{.Name}}", check=False).stdout.split()
                      if n.startswith(prefix)]
    if stale_networks:
        podman("network", "rm", "--force", *stale_networks, check=False)


@pytest.fixture(scope="module")
def cluster(built_images: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OneMachineCluster]:
    """Module-scoped: its pods run as uid 10001, the uid the sandbox tests later run code as, and
    RLIMIT_NPROC counts every process of a uid; the cluster must be gone before they start."""
    remove_leftovers()
    network = f"flowlane-test-{os.getpid()}"
    with one_machine_cluster(tmp_path_factory.mktemp("cluster"), namespace="flowlane-e2e", network=network,
                             reconcile_interval_s=1.0) as running:
        yield running
