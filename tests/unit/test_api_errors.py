"""The management API answers every error in its JSON shape, the router's own
404 and 405 too (the real app over a local port; no QEMU, no domain)."""
from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from ferry.api.consoles import Consoles
from ferry.api.server import make_app
from ferry.domains import DomainService
from ferry.errors import FerryError, InvalidInput, NotFound
from ferry.events import EventBus
from ferry.hostconfig import HostConfig
from ferry.migration.source import MigrationService
from ferry.models import HostInfo
from ferry.store import Store


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    host = HostConfig(name="ha", state_dir=tmp_path)
    store = Store(tmp_path / "ferry.db")
    svc = DomainService(host, store, "tcg", EventBus())

    def hostinfo() -> HostInfo:
        raise AssertionError("not asked in these tests")

    app = make_app(svc, hostinfo, MigrationService(host, svc, store),
                   Consoles(host, svc, store))
    async with TestClient(TestServer(app)) as client:
        yield client
    store.close()


async def error_of(resp: Any) -> FerryError:
    assert resp.content_type == "application/json"
    return FerryError.from_json((await resp.json())["error"])


async def test_unknown_route_is_a_json_not_found(api: TestClient[Any, Any]) -> None:
    resp = await api.get("/v1/nope")
    assert resp.status == 404
    err = await error_of(resp)
    assert isinstance(err, NotFound) and err.message == "no such API route: GET /v1/nope"
    assert err.details == {"method": "GET", "path": "/v1/nope"}


async def test_wrong_method_is_a_json_405(api: TestClient[Any, Any]) -> None:
    resp = await api.patch("/v1/domains")
    assert resp.status == 405
    assert resp.headers["Allow"] == "GET, HEAD, POST"
    err = await error_of(resp)
    assert isinstance(err, InvalidInput)
    assert err.message == "method PATCH not allowed on /v1/domains (allowed: GET, HEAD, POST)"
    assert err.details["allowed"] == ["GET", "HEAD", "POST"]


async def test_a_route_that_exists_still_answers(api: TestClient[Any, Any]) -> None:
    resp = await api.get("/v1/domains")
    assert resp.status == 200 and await resp.json() == []
    resp = await api.get("/v1/domains/ghost")
    assert resp.status == 404
    assert "no domain named 'ghost'" in (await error_of(resp)).message
