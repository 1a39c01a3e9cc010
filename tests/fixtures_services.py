"""External service fixtures: an S3 endpoint (moto server), an MLflow server, a cuttable TCP link.

Tests talk to real servers over loopback, never to mocks patched into the client: the checkpoint
store must survive what a real S3 endpoint does (auth failures, missing buckets, connections
dropped mid-upload), and the tracker must work against a real ``mlflow server`` process.

- ``s3_server`` (session): moto's server mode as a subprocess with IAM authentication switched
  on, so wrong credentials are really rejected. The fixture creates one IAM user and yields its
  keys. ``stop()``/``start()`` restart it on the same port, but moto keeps its state in memory:
  a restart loses every bucket and object and issues new keys (``access_key``/``secret_key`` are
  refreshed). To take an endpoint down *without* losing state, put a :class:`TcpLink` in front of
  it and cut the link instead (``tcp_link`` fixture).
- ``mlflow_server`` (session): ``mlflow server`` with a sqlite backend and a local artifact
  root, one worker, background jobs off; yields the tracking URI.
- ``tcp_link`` (function): a factory for :class:`TcpLink`, a loopback TCP forwarder that can be
  cut (listener closed, live connections reset) and restored on the same port, optionally
  cutting itself after N bytes so "the endpoint died mid-upload" is deterministic.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

_BIN = Path(sys.executable).parent
_LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((_LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float, log: Path,
                   host: str = _LOOPBACK) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening; log: {log}")
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {host}:{port} within {timeout_s}s; log: {log}")


def _stop_process_group(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM the process group we started (start_new_session=True), then SIGKILL if needed."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)


# --------------------------------------------------------------------------------------- S3 (moto)


class MotoS3Server:
    """moto's S3 (and IAM) server on loopback with signature checking switched on."""

    region = "us-east-1"

    def __init__(self, log_dir: Path, port: int | None = None, host: str = _LOOPBACK) -> None:
        self.host = host
        self.port = port or free_port()
        self.access_key = ""
        self.secret_key = ""
        self._log_dir = log_dir
        self._proc: subprocess.Popen[bytes] | None = None
        self._bucket_ids = itertools.count(1)

    @property
    def endpoint(self) -> str:
        """``host:port``, what the minio SDK and FLOWLANE_S3_ENDPOINT take."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def start(self) -> None:
        """Start (or restart, same port) with empty state, then create a user and enforce auth."""
        if self._proc is not None and self._proc.poll() is None:
            return
        log = self._log_dir / f"moto-{self.port}.log"
        with log.open("ab") as log_file:
            self._proc = subprocess.Popen(
                [str(_BIN / "moto_server"), "-H", self.host, "-p", str(self.port)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_for_port(self.port, self._proc, timeout_s=60, log=log, host=self.host)
        self._enable_auth()

    def stop(self) -> None:
        if self._proc is not None:
            _stop_process_group(self._proc)
            self._proc = None

    def _enable_auth(self) -> None:
        # moto authenticates nothing until told to; create a user with an allow-all policy while
        # auth is still off, then make every later request prove its signature.
        import boto3
        import requests

        iam = boto3.client(
            "iam",
            endpoint_url=self.url,
            region_name=self.region,
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName="flowlane-tests")
        key = iam.create_access_key(UserName="flowlane-tests")["AccessKey"]
        allow_all = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="flowlane-tests", PolicyName="allow-all", PolicyDocument=json.dumps(allow_all))
        requests.post(f"{self.url}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
        self.access_key = key["AccessKeyId"]
        self.secret_key = key["SecretAccessKey"]

    def client(self):  # -> minio.Minio
        from minio import Minio

        return Minio(self.endpoint, access_key=self.access_key, secret_key=self.secret_key, secure=False)

    def make_bucket(self, name: str = "ckpt") -> str:
        """Create a fresh bucket and return its name (a unique suffix keeps tests apart)."""
        stem = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40] or "bucket"
        bucket = f"{stem}-{next(self._bucket_ids)}"
        self.client().make_bucket(bucket)
        return bucket

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should use this endpoint (the checkpoint store reads it)."""
        return {
            "FLOWLANE_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3Server]:
    server = MotoS3Server(tmp_path_factory.mktemp("moto"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def minio_client(s3_server: MotoS3Server):  # -> minio.Minio
    """A minio client with the session server's current credentials (for checking what a test wrote)."""
    return s3_server.client()


# ------------------------------------------------------------------------------------------ MLflow


@contextlib.contextmanager
def running_mlflow_server(root: Path, host: str = _LOOPBACK) -> Iterator[str]:
    """A real ``mlflow server`` (sqlite backend, proxied local artifacts) on ``host``; yields its URI."""
    import requests

    port = free_port()
    log = root / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [str(_BIN / "mlflow"), "server", "--host", host, "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")]
    if host != _LOOPBACK:  # pods reach it by address: let their Host header through
        command += ["--allowed-hosts", f"{host}:{port},{host},localhost:{port},127.0.0.1:{port}"]
    with log.open("ab") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=root, env=env,
                                start_new_session=True)
    uri = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}; log: {log}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{uri}/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not healthy after 180s; log: {log}")
            time.sleep(0.3)
        yield uri
    finally:
        _stop_process_group(proc)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` on loopback; yields its URI."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri


# ---------------------------------------------------------------------------------------- TCP link


class TcpLink:
    """A loopback TCP forwarder in front of a server, which a test can cut and restore.

    ``cut()`` closes the listener and resets every live connection: to a client this looks
    exactly like the server dying (connection reset, then connection refused), while the server
    behind keeps its state. ``restore()`` listens again on the same port. ``cut_after(n)`` arms an
    automatic cut once ``n`` more client->server bytes went through, so a test can kill the
    endpoint in the middle of an upload deterministically.
    """

    def __init__(self, target_port: int, target_host: str = _LOOPBACK) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.bytes_up = 0  # client -> server bytes forwarded since creation
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._cut_at: int | None = None
        self._on_cut: Callable[[], None] | None = None

    @property
    def endpoint(self) -> str:
        return f"{_LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    def restore(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((_LOOPBACK, self.port))
            listener.listen(64)
            self._listener = listener
        threading.Thread(target=self._accept_loop, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
            self._cut_at = None
            on_cut, self._on_cut = self._on_cut, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                # SO_LINGER 0: close with RST, like a dead peer, not a polite FIN.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.close()
        if on_cut is not None:
            on_cut()

    def cut_after(self, n_bytes: int, on_cut: Callable[[], None] | None = None) -> None:
        """Cut the link once ``n_bytes`` more client->server bytes have been forwarded."""
        with self._lock:
            self._cut_at = self.bytes_up + n_bytes
            self._on_cut = on_cut

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # cut while connecting
                    client.close()
                    upstream.close()
                    return
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                cut_now = False
                if upstream:
                    with self._lock:
                        self.bytes_up += len(data)
                        cut_now = self._cut_at is not None and self.bytes_up >= self._cut_at
                if cut_now:
                    self.cut()
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)


@pytest.fixture
def tcp_link() -> Iterator[Callable[[int], TcpLink]]:
    """Factory: ``tcp_link(target_port)`` -> a started :class:`TcpLink`; all cut at test end."""
    links: list[TcpLink] = []

    def make(target_port: int) -> TcpLink:
        link = TcpLink(target_port)
        link.restore()
        links.append(link)
        return link

    yield make
    for link in links:
        link.cut()
