"""The host's state in SQLite: domain definitions and their stored state.

State is stored, not inferred: the domain service writes it on every
transition, and reconciles it with what really runs when ferryd starts.
"""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.models import DomainConfig, DomainState

SCHEMA = """
CREATE TABLE IF NOT EXISTS domains (
    name         TEXT PRIMARY KEY,
    uuid         TEXT NOT NULL UNIQUE,
    config       TEXT NOT NULL,
    state        TEXT NOT NULL,
    state_reason TEXT NOT NULL DEFAULT '',
    state_since  REAL NOT NULL,
    accel        TEXT
);
CREATE TABLE IF NOT EXISTS migrations (
    id      TEXT NOT NULL,
    role    TEXT NOT NULL,
    domain  TEXT NOT NULL,
    state   TEXT NOT NULL,
    started REAL NOT NULL,
    record  TEXT NOT NULL,
    PRIMARY KEY (id, role)
);
"""


@dataclass
class DomainRecord:
    config: DomainConfig
    state: DomainState
    state_reason: str
    state_since: float
    accel: str | None


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def domains(self) -> list[DomainRecord]:
        rows = self._db.execute(
            "SELECT config, state, state_reason, state_since, accel FROM domains ORDER BY name")
        return [_record(row) for row in rows]

    def get(self, name: str) -> DomainRecord | None:
        row = self._db.execute(
            "SELECT config, state, state_reason, state_since, accel FROM domains WHERE name=?",
            (name,)).fetchone()
        return _record(row) if row else None

    def find_uuid(self, uuid: str) -> str | None:
        row = self._db.execute("SELECT name FROM domains WHERE uuid=?", (uuid,)).fetchone()
        return row[0] if row else None

    def insert(self, config: DomainConfig, state: DomainState) -> None:
        self._db.execute(
            "INSERT INTO domains (name, uuid, config, state, state_since) VALUES (?,?,?,?,?)",
            (config.name, str(config.uuid), config.model_dump_json(), state.value, time.time()))

    def set_state(self, name: str, state: DomainState, reason: str,
                  accel: str | None = None) -> None:
        self._db.execute(
            "UPDATE domains SET state=?, state_reason=?, state_since=?, "
            "accel=COALESCE(?, accel) WHERE name=?",
            (state.value, reason, time.time(), accel, name))

    def delete(self, name: str) -> None:
        self._db.execute("DELETE FROM domains WHERE name=?", (name,))

    # -- migration records: the job as JSON, with the columns we query by ---------------
    def save_migration(self, record: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO migrations (id, role, domain, state, started, record) "
            "VALUES (?,?,?,?,?,?)",
            (record["id"], record["role"], record["domain"], record["state"],
             record["started"], json.dumps(record)))

    def migrations(self, state: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT record FROM migrations"
        args: tuple[str, ...] = ()
        if state is not None:
            sql += " WHERE state=?"
            args = (state,)
        rows = self._db.execute(sql + " ORDER BY started", args)
        return [json.loads(row[0]) for row in rows]


def _record(row: tuple[str, str, str, float, str | None]) -> DomainRecord:
    return DomainRecord(config=DomainConfig.model_validate(json.loads(row[0])),
                        state=DomainState(row[1]), state_reason=row[2],
                        state_since=row[3], accel=row[4])
