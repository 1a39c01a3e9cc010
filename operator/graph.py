"""A FlowRun compiled into a process graph: what runs, with which command, talking to whom.

The graph is the one description of a training run that both backends place. The Kubernetes
operator turns each component into a pod (``render.py``); the local backend (``local.py``) turns
it into a supervised process on this machine. Compiling once keeps the two byte-for-byte the same
up to addresses, so what CI runs locally is what the pods run.

Addresses are abstract. A command line or environment value names another component's port with
a placeholder, ``{address:learner.grpc}`` (host:port), ``{host:learner-0.rendezvous}`` (the host
alone) or ``{port:sandbox-0.grpc}`` (the number), and each backend fills them in: the local backend
with loopback ports it allocates, Kubernetes with Service DNS names and fixed container ports.
Secrets are abstract too: ``secret_env`` names a Secret key, which Kubernetes injects with
``secretKeyRef`` and the local backend generates or reads.

The command-line contract with the components (implemented in runtime/ and trainer/):

- ``flowlane learner --config CONFIG --port PORT``; with several ranks in the learner pod
  (``learner.ranks``, default one per GPU) the same command under
  ``torchrun --standalone --nproc-per-node N``: rank 0 serves the port, the other ranks follow it.
  With several learner pods (``learner.replicas: M``) there are M learner components,
  ``learner-0`` .. ``learner-<M-1>``, one *group*: each runs the command under
  ``torchrun --nnodes M --node-rank i --nproc-per-node N --master-addr/--master-port`` at
  learner-0's ``rendezvous`` port (static rendezvous: every node knows its rank and where rank 0
  is, as Kubeflow Trainer starts torch nodes). Only learner-0 serves gRPC.
- ``flowlane rollout --config CONFIG --learner HOST:PORT --sandbox HOST:PORT [--sandbox ...]``
- ``flowlane sandbox --config CONFIG --port PORT``

and every component gets ``FLOWLANE_RUN``, ``FLOWLANE_COMPONENT`` (e.g. ``rollout-1``),
``FLOWLANE_ROLE``, ``FLOWLANE_REPLICA_INDEX`` and the shared gRPC token in ``FLOWLANE_GRPC_TOKEN``.
This module is pure: no I/O, no Kubernetes, no processes.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flowlane.api.common import Resources
from flowlane.api.flowrun import FlowRun, WeightSync, tool_secret_env

#: Where the rendered run config is mounted in pods (the local backend passes its own path).
POD_CONFIG_PATH = "/etc/flowlane/run.yaml"
LEARNER_GRPC_PORT = 50051
#: Where torchrun's rendezvous store listens on the first learner pod (torch.distributed's default).
LEARNER_RENDEZVOUS_PORT = 29500
SANDBOX_GRPC_PORT = 50052

ENV_RUN = "FLOWLANE_RUN"
ENV_COMPONENT = "FLOWLANE_COMPONENT"
ENV_ROLE = "FLOWLANE_ROLE"
ENV_REPLICA_INDEX = "FLOWLANE_REPLICA_INDEX"
ENV_GRPC_TOKEN = "FLOWLANE_GRPC_TOKEN"  # the same name flowlane/kit/grpc_common.py reads
ENV_S3_ENDPOINT = "FLOWLANE_S3_ENDPOINT"
ENV_S3_ACCESS_KEY = "AWS_ACCESS_KEY_ID"
ENV_S3_SECRET_KEY = "AWS_SECRET_ACCESS_KEY"
ENV_MLFLOW_URI = "MLFLOW_TRACKING_URI"
ENV_MLFLOW_EXPERIMENT = "MLFLOW_EXPERIMENT_NAME"

#: Spec fields only the operator or the supervisor acts on. They are left out of the run config the
#: components read, so flipping ``suspend`` or raising ``backoffLimit`` does not roll the pods.
PLACEMENT_ONLY_FIELDS = ("suspend", "backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished")

PLACEHOLDER = re.compile(r"\{(port|address|host):([A-Za-z0-9_.-]+)\.([A-Za-z0-9_-]+)\}")


class Role(enum.StrEnum):
    LEARNER = "learner"
    ROLLOUT = "rollout"
    SANDBOX = "sandbox"


class Protocol(enum.StrEnum):
    GRPC = "grpc"
    HTTP = "http"
    TCP = "tcp"  # a plain socket, e.g. torchrun's rendezvous store


@dataclass(frozen=True)
class Port:
    """A named port a component listens on; ``number`` is its fixed number in a pod."""

    name: str
    number: int
    protocol: Protocol = Protocol.GRPC


@dataclass(frozen=True)
class SecretEnv:
    """An environment value taken from a Secret key (``secretKeyRef`` on Kubernetes)."""

    secret: str
    key: str


@dataclass(frozen=True)
class Component:
    """One process of the run: a pod on Kubernetes, a supervised process locally."""

    name: str  # unique in the graph: learner, rollout-0, sandbox-1
    role: Role
    index: int  # replica index within its role
    argv: tuple[str, ...]  # may contain {address:...} / {port:...} placeholders
    env: Mapping[str, str]
    secret_env: Mapping[str, SecretEnv]
    ports: tuple[Port, ...]
    resources: Resources
    depends_on: tuple[str, ...] = ()
    #: The port that accepts connections once the component is ready; None: ready when started.
    ready_port: str | None = None
    #: True for a server that runs until stopped (sandbox); False for a job that exits 0 when done.
    service: bool = False
    #: The group of pods this one belongs to and is addressed within (several learner pods: "learner");
    #: on Kubernetes one headless Service per group gives each member a stable DNS name.
    group: str | None = None

    def port(self, name: str) -> Port:
        for port in self.ports:
            if port.name == name:
                return port
        raise KeyError(f"component {self.name!r} has no port {name!r}")


@dataclass(frozen=True)
class ProcessGraph:
    """Every component of one FlowRun, plus the run config they all read."""

    run: str
    namespace: str
    components: tuple[Component, ...]
    config: dict[str, Any] = field(hash=False)
    config_path: str
    token: SecretEnv  # the shared gRPC token
    #: True when no Secret was named in the spec: the backend creates (or generates) the token.
    token_generated: bool = True

    def component(self, name: str) -> Component:
        for component in self.components:
            if component.name == name:
                return component
        raise KeyError(f"no component {name!r} in the graph of {self.run!r}")

    def by_role(self, role: Role) -> list[Component]:
        return [c for c in self.components if c.role is role]

    @property
    def lead_learner(self) -> str:
        """The learner component that serves gRPC (rank 0's): ``learner``, or ``learner-0`` of several."""
        return next(c.name for c in self.components if c.role is Role.LEARNER and c.index == 0)

    def group(self, name: str) -> list[Component]:
        return [c for c in self.components if c.group == name]



def address(component: str, port: str) -> str:
    """Placeholder for ``host:port`` of another component's port."""
    return f"{{address:{component}.{port}}}"


def host(component: str, port: str) -> str:
    """Placeholder for the host part of ``address(component, port)``."""
    return f"{{host:{component}.{port}}}"


def port_number(component: str, port: str) -> str:
    """Placeholder for the number of a component's port."""
    return f"{{port:{component}.{port}}}"


def resolve(text: str, address_of: Callable[[str, str], str], port_of: Callable[[str, str], int]) -> str:
    """Fill every placeholder in ``text`` using the backend's address and port lookups."""

    def substitute(match: re.Match[str]) -> str:
        kind, component, port = match.groups()
        if kind == "port":
            return str(port_of(component, port))
        where = address_of(component, port)
        return where.rpartition(":")[0] if kind == "host" else where

    return PLACEHOLDER.sub(substitute, text)


def run_config(flowrun: FlowRun) -> dict[str, Any]:
    """The config file every component reads: the FlowRun without status and placement-only fields."""
    config = flowrun.run_config()
    for key in PLACEMENT_ONLY_FIELDS:
        config["spec"].pop(key, None)
    return config


def token_secret(flowrun: FlowRun) -> tuple[SecretEnv, bool]:
    """The Secret key holding the gRPC token, and whether flowlane must create it."""
    if flowrun.spec.grpc_auth is not None:
        return SecretEnv(flowrun.spec.grpc_auth.name, flowrun.spec.grpc_auth.key), False
    return SecretEnv(f"{flowrun.name}-grpc-token", "token"), True


def compile_graph(flowrun: FlowRun, *, config_path: str = POD_CONFIG_PATH) -> ProcessGraph:
    """Compile ``flowrun`` into its components: the learner pods, N rollout workers, M sandboxes."""
    spec = flowrun.spec
    token, generated = token_secret(flowrun)
    s3_plain, s3_secret = _s3_env(flowrun)

    learners = _learners(flowrun, config_path, token, s3_plain, s3_secret)
    lead = learners[0].name

    sandboxes = [
        Component(
            name=f"sandbox-{i}",
            role=Role.SANDBOX,
            index=i,
            argv=("flowlane", "sandbox", "--config", config_path, "--port", port_number(f"sandbox-{i}", "grpc")),
            env=_base_env(flowrun, f"sandbox-{i}", Role.SANDBOX, i),
            secret_env={ENV_GRPC_TOKEN: token},  # servers verify callers; sandboxes get no other secret
            ports=(Port("grpc", SANDBOX_GRPC_PORT),),
            resources=spec.sandbox.resources,
            ready_port="grpc",
            service=True,
        )
        for i in range(spec.sandbox.replicas)
    ]

    rollout_needs_s3 = spec.engine.weight_sync is WeightSync.STORE or spec.model.planner.startswith("s3://")
    tool_secrets = {
        tool_secret_env(t.name): SecretEnv(t.credentials_secret.name, t.credentials_secret.key)
        for t in spec.tools
        if t.credentials_secret is not None
    }
    sandbox_args: list[str] = []
    for sandbox in sandboxes:
        sandbox_args += ["--sandbox", address(sandbox.name, "grpc")]
    rollouts = [
        Component(
            name=f"rollout-{i}",
            role=Role.ROLLOUT,
            index=i,
            argv=("flowlane", "rollout", "--config", config_path, "--learner", address(lead, "grpc"),
                  *sandbox_args),
            env=_base_env(flowrun, f"rollout-{i}", Role.ROLLOUT, i) | (s3_plain if rollout_needs_s3 else {}),
            secret_env={ENV_GRPC_TOKEN: token, **(s3_secret if rollout_needs_s3 else {}), **tool_secrets},
            ports=(),
            resources=spec.rollout.resources,
            depends_on=(lead, *(s.name for s in sandboxes)),
        )
        for i in range(spec.rollout.replicas)
    ]
    return ProcessGraph(
        run=flowrun.name,
        namespace=flowrun.namespace,
        components=(*learners, *sandboxes, *rollouts),
        config=run_config(flowrun),
        config_path=config_path,
        token=token,
        token_generated=generated,
    )


def _base_env(flowrun: FlowRun, name: str, role: Role, index: int) -> dict[str, str]:
    return {ENV_RUN: flowrun.name, ENV_COMPONENT: name, ENV_ROLE: role.value, ENV_REPLICA_INDEX: str(index)}


def _learners(flowrun: FlowRun, config_path: str, token: SecretEnv, s3_plain: Mapping[str, str],
              s3_secret: Mapping[str, SecretEnv]) -> list[Component]:
    """The learner: one component, or with ``learner.replicas: M`` a group learner-0 .. learner-<M-1>.

    Every learner pod reads and writes the checkpoint store (each uploads its own ZeRO shards),
    so each gets the storage credentials; only the first serves gRPC and is waited for.
    """
    spec = flowrun.spec.learner
    tracking = flowrun.spec.tracking
    pods, ranks = spec.replicas, spec.ranks_per_replica
    names = ["learner"] if pods == 1 else [f"learner-{i}" for i in range(pods)]
    command = ("learner", "--config", config_path, "--port", port_number(names[0], "grpc"))
    learners = []
    for index, name in enumerate(names):
        env = _base_env(flowrun, name, Role.LEARNER, index) | dict(s3_plain)
        if tracking.mlflow_uri:
            env[ENV_MLFLOW_URI] = tracking.mlflow_uri
        env[ENV_MLFLOW_EXPERIMENT] = tracking.experiment
        if pods > 1:
            launcher = torchrun_args(ranks, nodes=pods, node_rank=index,
                                     master=(host(names[0], "rendezvous"), port_number(names[0], "rendezvous")))
            argv: tuple[str, ...] = ("torchrun", *launcher, "-m", "flowlane.cli", *command)
        elif ranks > 1:
            argv = ("torchrun", *torchrun_args(ranks), "-m", "flowlane.cli", *command)
        else:
            argv = ("flowlane", *command)
        lead = index == 0
        ports: tuple[Port, ...] = ()
        if lead:
            ports = (Port("grpc", LEARNER_GRPC_PORT),)
        if lead and pods > 1:
            ports += (Port("rendezvous", LEARNER_RENDEZVOUS_PORT, Protocol.TCP),)
        learners.append(Component(
            name=name,
            role=Role.LEARNER,
            index=index,
            argv=argv,
            env=env,
            secret_env={ENV_GRPC_TOKEN: token, **s3_secret},
            ports=ports,
            resources=spec.resources,
            ready_port="grpc" if lead else None,
            group="learner" if pods > 1 else None,
        ))
    return learners


def torchrun_args(ranks: int, *, nodes: int = 1, node_rank: int = 0,
                  master: tuple[str, str] | None = None) -> tuple[str, ...]:
    """torchrun options for ``ranks`` processes in one pod (one learner replica); it sets RANK,
    WORLD_SIZE, MASTER_ADDR/PORT for each and stops them all when one fails.

    With ``nodes > 1`` the pod is node ``node_rank`` of that many, meeting at ``master`` (host, port
    of the first pod's rendezvous store); a rank that fails ends its pod, and the group restarts.
    """
    if nodes == 1:
        return ("--standalone", f"--nproc-per-node={ranks}", "--max-restarts=0")
    if master is None:
        raise ValueError("torchrun_args: several nodes need the master's host and port")
    return (f"--nnodes={nodes}", f"--node-rank={node_rank}", f"--nproc-per-node={ranks}",
            f"--master-addr={master[0]}", f"--master-port={master[1]}", "--max-restarts=0")


def _s3_env(flowrun: FlowRun) -> tuple[dict[str, str], dict[str, SecretEnv]]:
    storage = flowrun.spec.storage
    plain: dict[str, str] = {}
    secret: dict[str, SecretEnv] = {}
    if storage.s3_endpoint:
        plain[ENV_S3_ENDPOINT] = storage.s3_endpoint
    if storage.credentials_secret is not None:
        creds = storage.credentials_secret
        secret[ENV_S3_ACCESS_KEY] = SecretEnv(creds.name, creds.access_key_key)
        secret[ENV_S3_SECRET_KEY] = SecretEnv(creds.name, creds.secret_key_key)
    return plain, secret
