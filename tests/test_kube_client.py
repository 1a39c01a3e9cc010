"""The operator's API client: credentials that expire are read again, not kept forever."""

from __future__ import annotations

from typing import Any

import aiohttp.web
import kopf

from flowlane.operator.kube_client import PODS, KubeClient


async def test_an_expired_token_is_read_again_and_the_request_retried() -> None:
    tokens = ["old"]
    seen: list[str] = []

    async def pod(request: aiohttp.web.Request) -> aiohttp.web.Response:
        seen.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") != "Bearer new":
            return aiohttp.web.json_response({"kind": "Status", "code": 401, "message": "Unauthorized"}, status=401)
        return aiohttp.web.json_response({"kind": "Pod", "metadata": {"name": "p"}})

    app = aiohttp.web.Application()
    app.router.add_get("/api/v1/namespaces/ns/pods/p", pod)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def login() -> kopf.ConnectionInfo:  # what a bound service-account token file holds by now
        return kopf.ConnectionInfo(server=f"http://127.0.0.1:{port}", token=tokens[-1], scheme="Bearer")

    client = KubeClient(login(), relogin=login)
    try:
        tokens.append("new")  # the kubelet rotated the token; the one the client holds has expired
        found: Any = await client.get(PODS, "ns", "p")
        assert found["metadata"]["name"] == "p"
        assert seen == ["Bearer old", "Bearer new"]
        await client.get(PODS, "ns", "p")
        assert seen[-1] == "Bearer new"  # the new token stays
    finally:
        await client.close()
        await runner.cleanup()


async def test_a_refused_token_that_stays_refused_is_an_error_not_a_loop() -> None:
    async def pod(request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"kind": "Status", "code": 401, "message": "Unauthorized"}, status=401)

    app = aiohttp.web.Application()
    app.router.add_get("/api/v1/namespaces/ns/pods/p", pod)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    logins: list[int] = []

    def login() -> kopf.ConnectionInfo:
        logins.append(1)
        return kopf.ConnectionInfo(server=f"http://127.0.0.1:{port}", token="revoked", scheme="Bearer")

    from flowlane.operator.kube_client import ApiError

    client = KubeClient(login(), relogin=login)
    try:
        try:
            await client.get(PODS, "ns", "p")
            raise AssertionError("a 401 after a fresh login must raise")
        except ApiError as exc:
            assert exc.status == 401
        assert len(logins) == 2  # the first login, one fresh read, no more
    finally:
        await client.close()
        await runner.cleanup()
