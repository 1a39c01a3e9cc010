"""The S3 settings flowlane reads everywhere (checkpoints, task sets) and one way to build a client.

Any S3 endpoint works (MinIO, AWS, a test server); the endpoint is ``host:port`` or a URL whose
scheme decides TLS. Credentials and region default to the usual AWS variables.
"""

from __future__ import annotations

import os
from typing import Any

ENDPOINT_ENV = "FLOWLANE_S3_ENDPOINT"
ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
REGION_ENVS = ("AWS_REGION", "AWS_DEFAULT_REGION")


def split_endpoint(endpoint: str, secure: bool = False) -> tuple[str, bool]:
    """``(host:port, secure)`` from ``host:port`` or ``http(s)://host:port/``; a scheme overrides ``secure``."""
    if "://" in endpoint:
        scheme, _, endpoint = endpoint.partition("://")
        secure = scheme == "https"
    return endpoint.rstrip("/"), secure


def env_region() -> str | None:
    return next((os.environ[name] for name in REGION_ENVS if os.environ.get(name)), None)


def open_client(
    endpoint: str,
    access_key: str | None,
    secret_key: str | None,
    *,
    secure: bool = False,
    region: str | None = None,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 60.0,
    retries: Any = None,
    pool_size: int = 10,
) -> Any:
    """A ``minio.Minio`` client with explicit timeouts; ``retries`` is a ``urllib3.Retry`` (None: none)."""
    import urllib3
    from minio import Minio

    host, secure = split_endpoint(endpoint, secure)
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
        retries=retries if retries is not None else urllib3.Retry(total=0, redirect=3, raise_on_status=False),
        maxsize=pool_size,
    )
    return Minio(host, access_key=access_key, secret_key=secret_key, secure=secure, region=region, http_client=http)
