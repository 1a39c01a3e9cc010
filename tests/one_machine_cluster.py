"""The cluster path on one machine: an emulated API server, the real operator image and a node agent.

flowlane's headline path is ``helm install`` plus ``kubectl apply -f flowrun.yaml`` on a real
cluster. No kube-apiserver or kubelet can run on this project's machines, but a container engine
can; so this module joins real parts into a one-node cluster:

- the KMock API emulator (``fixtures_kube``), bound to the gateway address of a podman network
  of our own, so both the host (kubectl, tests) and the containers reach it;
- the operator, from its own image (``images/Dockerfile.operator``), running as a container on
  that network with a kubeconfig for the emulator: it renders Pods exactly as on a cluster and
  asks each run's learner for progress over gRPC through Service DNS names;
- the node agent (``node_agent``), which runs the Pods the operator creates as containers from
  the images in ``images/`` and writes their status back;
- the storage a company cluster would offer: moto's S3 server (for MinIO) and an MLflow server,
  on the network's gateway address, so pods reach them by address.

It is test infrastructure: the product targets real Kubernetes. Run it by hand with
``.venv/bin/python tests/one_machine_cluster.py up`` (see the README's "Try the cluster path on
one machine"); the end-to-end tests start it once per session (``fixtures_cluster``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures_kube import KMockServer, write_kubeconfig
from fixtures_services import MotoS3Server, running_mlflow_server
from node_agent import LABEL, NodeAgent, pod_container, podman

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def image_version() -> str:
    for line in (REPO / "pyproject.toml").read_text().splitlines():
        if line.startswith("version = "):
            return line.split('"')[1]
    raise RuntimeError("pyproject.toml has no version")


REGISTRY = os.environ.get("FLOWLANE_IMAGE_REGISTRY", "ghcr.io/flowlane")
VERSION = image_version()
IMAGES = {name: f"{REGISTRY}/flowlane-{name}:{VERSION}" for name in ("operator", "sandbox", "learner", "rollout",
                                                                       "gateway")}


def build_images(*names: str) -> None:
    """Build (or, with warm caches, re-check) the images the cluster runs: scripts/build-images.sh."""
    subprocess.run(["bash", str(REPO / "scripts" / "build-images.sh"), *names], check=True, cwd=REPO)


def network_gateway(network: str) -> str:
    info = json.loads(podman("network", "inspect", network).stdout)[0]
    for subnet in info.get("subnets") or []:
        if subnet.get("gateway") and ":" not in subnet["gateway"]:
            return str(subnet["gateway"])
    raise RuntimeError(f"podman network {network} has no IPv4 gateway")


class OneMachineCluster:
    """Everything above, started by ``start()`` and removed by ``stop()``."""

    def __init__(self, workdir: Path, *, namespace: str = "default", network: str = "flowlane-cluster",
                 reconcile_interval_s: float = 2.0) -> None:
        self.workdir = workdir
        self.namespace = namespace
        self.network = network
        self.reconcile_interval_s = reconcile_interval_s
        self.operator_container = f"{network}-operator"
        self.kubeconfig = workdir / "kubeconfig"
        self.gateway = ""
        self.api: KMockServer | None = None
        self.s3: MotoS3Server | None = None
        self.mlflow_uri = ""
        self.agent: NodeAgent | None = None
        self._stack = contextlib.ExitStack()

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> OneMachineCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        agent = NodeAgent("http://placeholder", network=self.network, namespaces=[self.namespace],
                          workdir=self.workdir / "node")
        agent.ensure_networks()
        self._stack.callback(agent.remove_networks)
        self.gateway = network_gateway(self.network)
        self.api = KMockServer(host=self.gateway).start()
        self._stack.callback(self.api.stop)
        write_kubeconfig(self.kubeconfig, self.api.url, self.namespace)
        self.s3 = MotoS3Server(self.workdir, host=self.gateway)
        self.s3.start()
        self._stack.callback(self.s3.stop)
        mlflow_root = self.workdir / "mlflow"
        mlflow_root.mkdir(exist_ok=True)
        self.mlflow_uri = self._stack.enter_context(running_mlflow_server(mlflow_root, host=self.gateway))
        self.agent = NodeAgent(self.api.url, network=self.network, namespaces=[self.namespace],
                               workdir=self.workdir / "node").start()
        self._stack.callback(self.agent.stop)
        self.start_operator()

    def chart_operator_container(self) -> dict[str, Any]:
        """The operator's container exactly as the Helm chart renders it for this namespace."""
        result = subprocess.run(
            [str(BIN / "helm"), "template", "flowlane", str(REPO / "charts" / "flowlane"), "--namespace",
             "flowlane-system", "--set", f"operator.watchNamespaces={{{self.namespace}}}",
             "--set-string", f"operator.extraArgs={{--reconcile-interval,{self.reconcile_interval_s:g}}}"],
            capture_output=True, text=True, check=True, timeout=120)
        for doc in yaml.safe_load_all(result.stdout):
            if doc and doc.get("kind") == "Deployment":
                container: dict[str, Any] = doc["spec"]["template"]["spec"]["containers"][0]
                return container
        raise RuntimeError("the chart renders no operator Deployment")

    def start_operator(self) -> None:
        """The operator image with the chart's command, args, env and security context.

        Two additions, both because the emulator is not a real API server: a kubeconfig for it
        (it serves plain HTTP, so the in-cluster service-account login cannot reach it) and
        ``FLOWLANE_RESOURCE_SCANNING=false`` (it cannot list namespaces).
        """
        podman("rm", "--force", "--time", "2", self.operator_container, check=False)
        container_kubeconfig = self.workdir / "operator-kubeconfig"
        container_kubeconfig.write_text(self.kubeconfig.read_text())
        container_kubeconfig.chmod(0o644)
        chart = self.chart_operator_container()
        env = {e["name"]: e.get("value", "") for e in chart.get("env", []) if "value" in e}
        env["FLOWLANE_OPERATOR_NAMESPACE"] = "flowlane-system"  # the chart's fieldRef
        env.update({"KUBECONFIG": "/etc/flowlane-kube/config", "FLOWLANE_RESOURCE_SCANNING": "false"})
        sc = chart.get("securityContext") or {}
        security = ["--user", f"{sc['runAsUser']}:{sc['runAsGroup']}"] if sc.get("runAsUser") else []
        if sc.get("readOnlyRootFilesystem"):
            security += ["--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp"]
        if sc.get("allowPrivilegeEscalation") is False:
            security += ["--security-opt", "no-new-privileges"]
        security += [arg for cap in (sc.get("capabilities") or {}).get("drop", []) for arg in ("--cap-drop", cap)]
        podman("run", "--detach", "--name", self.operator_container, "--label", f"{LABEL}=1",
               "--network", self.network, *security,
               "--volume", f"{container_kubeconfig}:/etc/flowlane-kube/config:ro",
               *[arg for key, value in env.items() for arg in ("--env", f"{key}={value}")],
               "--entrypoint", json.dumps(chart["command"]), chart["image"], *chart.get("args", []))
        self._stack.callback(lambda: podman("rm", "--force", "--time", "2", self.operator_container, check=False))
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            result = podman("exec", self.operator_container, "python", "-c",
                            "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)",
                            check=False)
            if result.returncode == 0:
                return
            state = podman("inspect", "--format", "{{.State.Status}}", self.operator_container, check=False)
            if state.stdout.strip() == "exited":
                raise RuntimeError(f"the operator container exited:\n{self.operator_logs()}")
            time.sleep(1)
        raise RuntimeError(f"the operator did not become healthy in 90 s:\n{self.operator_logs()}")

    def stop(self) -> None:
        self._stack.close()

    # -- what tests and users do ------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The real kubectl against the emulated API server."""
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        result = subprocess.run([str(BIN / "kubectl"), *args], input=input, capture_output=True, text=True,
                                env=env, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def get(self, plural: str, name: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.kubectl("get", plural, name, "-o", "json").stdout)
        return data

    def operator_logs(self, tail: int = 200) -> str:
        result = podman("logs", "--tail", str(tail), self.operator_container, check=False)
        return result.stdout + result.stderr

    def pod_container(self, pod: str) -> str:
        return pod_container(self.namespace, pod)

    def pod_logs(self, pod: str, tail: int = 200) -> str:
        """The last ``tail`` lines the pod named ``pod`` logged, across its restarts and removal."""
        result = podman("logs", self.pod_container(pod), check=False)
        saved = self.agent.saved_logs(self.namespace, pod) if self.agent else ""
        return "\n".join((saved + result.stdout + result.stderr).splitlines()[-tail:])

    def s3_secret(self, name: str = "s3-credentials") -> dict[str, Any]:
        assert self.s3 is not None
        return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": self.namespace},
                "stringData": {"accessKey": self.s3.access_key, "secretKey": self.s3.secret_key}}

    def mlflow_runs(self, experiment: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.mlflow_uri}/api/2.0/mlflow/experiments/get-by-name",
                             params={"experiment_name": experiment}, timeout=10)
        if response.status_code != 200:
            return []
        experiment_id = response.json()["experiment"]["experiment_id"]
        runs = httpx.post(f"{self.mlflow_uri}/api/2.0/mlflow/runs/search",
                          json={"experiment_ids": [experiment_id]}, timeout=10).json()
        found: list[dict[str, Any]] = runs.get("runs", [])
        return found


@contextlib.contextmanager
def one_machine_cluster(workdir: Path, **kwargs: Any) -> Iterator[OneMachineCluster]:
    cluster = OneMachineCluster(workdir, **kwargs).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Start the one-machine cluster and keep it up until Ctrl-C.")
    parser.add_argument("command", choices=["up"])
    parser.add_argument("--workdir", type=Path, default=REPO / ".cluster")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--no-build", action="store_true", help="use the images as they are")
    args = parser.parse_args()
    if not args.no_build:
        build_images()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    with one_machine_cluster(args.workdir, namespace=args.namespace) as cluster:
        assert cluster.s3 is not None
        print(f"""one-machine cluster up (namespace {cluster.namespace})
  export KUBECONFIG={cluster.kubeconfig}
  S3 endpoint:  {cluster.s3.url}   (create the credentials Secret: see the README)
  S3 keys:      accessKey={cluster.s3.access_key} secretKey={cluster.s3.secret_key}
  MLflow:       {cluster.mlflow_uri}
  pods run as podman containers named k8s_<namespace>_<pod>_<uid>; Ctrl-C stops everything""", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while not stopped.wait(1):
                pass


if __name__ == "__main__":
    main()
