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


async def client_for(tmp_path: Path, browser: bool = False
                     ) -> tuple[TestClient[Any, Any], DomainService, Store]:
    host = HostConfig(name="ha", state_dir=tmp_path)
    store = Store(tmp_path / "ferry.db")
    svc = DomainService(host, store, "tcg", EventBus())
    app = make_app(svc, lambda: None, MigrationService(host, svc, store),  # type: ignore
                   Consoles(host, svc, store), browser=browser)
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


async def test_the_browser_listener_wants_its_header_for_changes(tmp_path: Path) -> None:
    client, svc, store = await client_for(tmp_path, browser=True)
    try:
        resp = await client.post("/v1/host/maintenance", json={"on": True})
        assert resp.status == 403 and "X-Ferry" in (await resp.json())["error"]["message"]
        assert svc.maintenance is False
        resp = await client.get("/v1/openapi.json")
        assert resp.status == 200
        resp = await client.get("/v1/events", headers={
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Origin": "http://evil.test"})
        assert resp.status == 403
    finally:
        await client.close()
        store.close()
