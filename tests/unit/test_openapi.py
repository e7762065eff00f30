"""The OpenAPI document: every route of the management app is in it, every
reference resolves, and it comes from the models the API validates with."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ferry.api.consoles import Consoles
from ferry.api.openapi import ROUTES, document
from ferry.api.server import make_app
from ferry.domains import DomainService
from ferry.events import EventBus
from ferry.hostconfig import HostConfig
from ferry.migration.source import MigrationService
from ferry.store import Store


def app_routes(tmp_path: Path) -> set[tuple[str, str]]:
    host = HostConfig(name="ha", state_dir=tmp_path)
    store = Store(tmp_path / "ferry.db")
    svc = DomainService(host, store, "tcg", EventBus())
    app = make_app(svc, lambda: None, MigrationService(host, svc, store),  # type: ignore
                   Consoles(host, svc, store))
    out = set()
    for route in app.router.routes():
        path = re.sub(r"\{(\w+):[^}]*\}", r"{\1}", route.resource.canonical)  # type: ignore
        if route.method in ("HEAD", "*") or path.startswith("/ui"):
            continue   # (the dashboard's own files are not the API)
        out.add((route.method, path))
    store.close()
    return out


def test_every_route_of_the_app_is_documented(tmp_path: Path) -> None:
    assert app_routes(tmp_path) == set(ROUTES)


def test_every_reference_resolves_and_models_are_there() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1")
    schemas = doc["components"]["schemas"]
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node["$ref"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    assert refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/") and \
            ref.rsplit("/", 1)[1] in schemas, ref
    migrate = doc["paths"]["/v1/domains/{name}/migrate"]["post"]
    body = migrate["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/MigrateRequest"}
    props = schemas["MigrateRequest"]["properties"]
    assert {"dest", "mode", "max_downtime_ms", "copy_storage"} <= set(props)
    assert migrate["parameters"][0]["name"] == "name"
