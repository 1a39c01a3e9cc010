"""The pure part of a local run: start order, ports, placeholders, secrets, argv and readiness.

Everything here decides from the graph (and the caller's overrides and environment) before any
process starts, so a bad graph, a taken port or a missing secret fails the start with nothing
running.
"""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Mapping, Sequence
from enum import StrEnum

from flowlane.api.errors import FlowlaneError
from flowlane.operator.graph import Component, resolve
from flowlane.operator.graph import Protocol as PortProtocol

LOOPBACK = "127.0.0.1"


class PortInUseError(FlowlaneError):
    """A component asked for a fixed port that another process holds."""


class StartupError(FlowlaneError):
    """A component did not become ready, or the graph itself is unusable."""


class ReadinessKind(StrEnum):
    NONE = "none"  # ready as soon as the process is started
    TCP = "tcp"  # a TCP connect to the port succeeds
    GRPC = "grpc"  # a gRPC server answers the HTTP/2 handshake on the port



def dependency_levels(components: Sequence[Component]) -> list[list[str]]:
    """Component names grouped so each group depends only on earlier groups.

    Raises ``StartupError`` for duplicate names, unknown dependencies and cycles.
    """
    names = [c.name for c in components]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise StartupError(f"duplicate component names: {', '.join(duplicates)}")
    by_name = {c.name: c for c in components}
    for c in components:
        unknown = [d for d in c.depends_on if d not in by_name]
        if unknown:
            raise StartupError(f"component {c.name!r} depends on unknown component(s): {', '.join(unknown)}")
    levels: list[list[str]] = []
    placed: set[str] = set()
    remaining = list(names)
    while remaining:
        level = [n for n in remaining if all(d in placed for d in by_name[n].depends_on)]
        if not level:
            raise StartupError(f"dependency cycle among components: {', '.join(remaining)}")
        levels.append(level)
        placed.update(level)
        remaining = [n for n in remaining if n not in placed]
    return levels


def render(text: str, ports: Mapping[str, Mapping[str, int]]) -> str:
    """Fill the graph's ``{port:comp.name}`` / ``{address:comp.name}`` placeholders with loopback values."""

    def port_of(component: str, port_name: str) -> int:
        try:
            return ports[component][port_name]
        except KeyError:
            raise StartupError(f"a placeholder names port {port_name!r} of component {component!r}, "
                               "which the graph does not declare") from None

    return resolve(text, lambda c, p: f"{LOOPBACK}:{port_of(c, p)}", port_of)


def readiness_of(component: Component) -> tuple[ReadinessKind, str]:
    """How to tell ``component`` is ready: the probe kind and the port name to probe."""
    if component.ready_port is None:
        return ReadinessKind.NONE, ""
    protocol = component.port(component.ready_port).protocol
    return (ReadinessKind.GRPC if protocol is PortProtocol.GRPC else ReadinessKind.TCP), component.ready_port


def local_argv(argv: Sequence[str]) -> list[str]:
    """``flowlane ...`` runs with this interpreter, so components share the supervisor's installation."""
    if argv and argv[0] == "flowlane":
        return [sys.executable, "-m", "flowlane.cli", *argv[1:]]
    if argv and argv[0] == "torchrun":  # the launcher of this interpreter, whatever is on PATH
        return [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    return list(argv)


def allocate_ports(
    components: Sequence[Component],
    overrides: Mapping[str, Mapping[str, int]] | None = None,
    host: str = LOOPBACK,
) -> dict[str, dict[str, int]]:
    """Choose a port for every declared port: ``overrides[component][port]`` if given, else any free one.

    All probe sockets stay open until every port is chosen, so two components never get the
    same port. Raises ``PortInUseError`` naming the component, port name and number.
    """
    overrides = overrides or {}
    chosen: dict[str, dict[str, int]] = {}
    probes: list[socket.socket] = []
    try:
        for c in components:
            chosen[c.name] = {}
            for port in c.ports:
                requested = overrides.get(c.name, {}).get(port.name, 0)
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                probes.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((host, requested))
                except OSError as err:
                    if err.errno == errno.EADDRINUSE:
                        raise PortInUseError(
                            f"component {c.name!r} port {port.name!r}: {host}:{requested} is already in use; "
                            "stop the process holding it or request another port (0 picks a free one)"
                        ) from None
                    raise PortInUseError(f"component {c.name!r} port {port.name!r}: cannot bind "
                                         f"{host}:{requested} ({err.strerror})") from None
                chosen[c.name][port.name] = int(sock.getsockname()[1])
    finally:
        for sock in probes:
            sock.close()
    return chosen


def secret_values(
    components: Sequence[Component], secrets: Mapping[str, str], environ: Mapping[str, str]
) -> dict[str, dict[str, str]]:
    """Per component, the ``secret_env`` values a local process gets (from ``secrets``, else ``environ``).

    Raises ``StartupError`` naming the first variable found in neither.
    """
    values: dict[str, dict[str, str]] = {}
    for c in components:
        values[c.name] = {}
        for env_name, ref in c.secret_env.items():
            value = secrets.get(env_name, environ.get(env_name))
            if value is None:
                raise StartupError(
                    f"component {c.name!r} needs {env_name} (Secret {ref.secret!r}, key {ref.key!r} on "
                    f"Kubernetes): set {env_name} in the environment for a local run"
                )
            values[c.name][env_name] = value
    return values
