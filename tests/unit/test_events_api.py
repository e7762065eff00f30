"""The events websocket (the real app over a local port, no QEMU): events as
they are published, numbered, filtered by domain; and the dashboard listener's
guard against other pages."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from ferry.api.consoles import Consoles
from ferry.api.server import make_app
from ferry.domains import DomainService
from ferry.events import EventBus
from ferry.hostconfig import HostConfig
from ferry.migration.source import MigrationService
from ferry.store import Store

UI = "127.0.0.1:7780"   # (the listener's configured address: its only Host)


async def client_for(tmp_path: Path, plain_http: str | None = None
                     ) -> tuple[TestClient[Any, Any], DomainService, Store]:
    host = HostConfig(name="ha", state_dir=tmp_path)
    store = Store(tmp_path / "ferry.db")
    svc = DomainService(host, store, "tcg", EventBus())
    app = make_app(svc, lambda: None, MigrationService(host, svc, store),  # type: ignore
                   Consoles(host, svc, store), plain_http=plain_http)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    return client, svc, store


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[TestClient[Any, Any], DomainService]]:
    client, svc, store = await client_for(tmp_path)
    yield client, svc
    await client.close()
    store.close()


async def next_event(ws: Any) -> dict[str, Any]:
    msg = await asyncio.wait_for(ws.receive(), 5)
    return dict(json.loads(msg.data))


async def test_events_arrive_numbered_with_the_host(api: Any) -> None:
    client, svc = api
    ws = await client.ws_connect("/v1/events")
    await asyncio.sleep(0.05)   # (subscribed once the handler runs)
    svc.events.publish("domain.state", domain="web", state="running", reason="started")
    svc.set_maintenance(True)
    first, second = await next_event(ws), await next_event(ws)
    assert first["kind"] == "domain.state" and first["host"] == "ha"
    assert first["domain"] == "web" and first["state"] == "running"
    assert second["kind"] == "host.maintenance" and second["on"] is True
    assert second["seq"] == first["seq"] + 1 and second["time"] >= first["time"]
    await ws.close()


async def test_events_for_one_domain_keep_the_hosts_own(api: Any) -> None:
    client, svc = api
    ws = await client.ws_connect("/v1/events?domain=web")
    await asyncio.sleep(0.05)
    svc.events.publish("domain.state", domain="other", state="running", reason="")
    svc.events.publish("domain.state", domain="web", state="paused", reason="")
    svc.set_maintenance(False)
    got = [await next_event(ws), await next_event(ws)]
    assert [(e["kind"], e.get("domain")) for e in got] == [
        ("domain.state", "web"), ("host.maintenance", None)]
    await ws.close()


async def test_a_bad_domain_filter_is_refused(api: Any) -> None:
    client, _ = api
    resp = await client.get("/v1/events?domain=../x")
    assert resp.status == 400
    assert "domain" in (await resp.json())["error"]["message"]


async def test_the_browser_listener_refuses_what_another_page_could_send(
        tmp_path: Path) -> None:
    client, svc, store = await client_for(tmp_path, plain_http=UI)
    ours = {"Host": UI}
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade",
               "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}

    async def refused(resp: Any, why: str) -> None:
        assert resp.status == 403, resp.status
        assert why in (await resp.json())["error"]["message"]

    try:
        # a change without the header (a form, a "simple" fetch)
        await refused(await client.post("/v1/host/maintenance", json={"on": True},
                                        headers=ours), "X-Ferry")
        # another origin, even with the header (its preflight is never granted)
        await refused(await client.post("/v1/host/maintenance", json={"on": True}, headers={
            **ours, "X-Ferry": "1", "Origin": "http://evil.test"}), "evil.test")
        await refused(await client.get("/v1/events", headers={
            **ours, **upgrade, "Origin": "http://evil.test"}), "evil.test")
        await refused(await client.get("/v1/domains", headers={
            **ours, "Sec-Fetch-Site": "cross-site"}), "cross-site")
        # a name rebound to 127.0.0.1 (DNS rebinding): same origin, wrong Host
        await refused(await client.get("/v1/domains", headers={
            "Host": "evil.test:7780", "Origin": "http://evil.test:7780"}), "evil.test")
        assert svc.maintenance is False
        # the dashboard itself, and a read without an Origin, get through
        resp = await client.get("/v1/openapi.json", headers=ours)
        assert resp.status == 200
        resp = await client.get("/v1/domains", headers={**ours, "Origin": f"http://{UI}",
                                                        "Sec-Fetch-Site": "same-origin"})
        assert resp.status == 200
    finally:
        await client.close()
        store.close()
