"""The host's state in SQLite: domain definitions and their stored state.

State is stored, not inferred: the domain service writes it on every
transition, and reconciles it with what really runs when ferryd starts.

The schema's version is the database's ``PRAGMA user_version``; opening a store
runs the upgrade steps it lacks, and refuses a database from a newer ferryd.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry import __version__
from ferry.errors import Refused
from ferry.models import DomainConfig, DomainState

log = logging.getLogger(__name__)

# Version 1: what every ferryd before user_version made (some without the
# migrations table). Frozen: a later schema change is a new step, not an edit here.
_V1_TABLES = (
    """CREATE TABLE IF NOT EXISTS domains (
        name         TEXT PRIMARY KEY,
        uuid         TEXT NOT NULL UNIQUE,
        config       TEXT NOT NULL,
        state        TEXT NOT NULL,
        state_reason TEXT NOT NULL DEFAULT '',
        state_since  REAL NOT NULL,
        accel        TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS migrations (
        id      TEXT NOT NULL,
        role    TEXT NOT NULL,
        domain  TEXT NOT NULL,
        state   TEXT NOT NULL,
        started REAL NOT NULL,
        record  TEXT NOT NULL,
        PRIMARY KEY (id, role)
    )""",
)


def _to_v1(db: sqlite3.Connection) -> None:
    for statement in _V1_TABLES:
        db.execute(statement)


def _to_v2(db: sqlite3.Connection) -> None:
    """Version 2: host-wide settings (maintenance mode)."""
    db.execute("""CREATE TABLE IF NOT EXISTS host_settings (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""")


# UPGRADES[n] takes a database from version n to n + 1. A new database is
# version 0 with no tables and takes every step, like an old one. To change the
# schema, append a step.
UPGRADES: tuple[Callable[[sqlite3.Connection], None], ...] = (_to_v1, _to_v2)

SCHEMA_VERSION = len(UPGRADES)
"""The schema this ferryd writes, kept in the database's ``PRAGMA user_version``."""


@dataclass
class DomainRecord:
    config: DomainConfig
    state: DomainState
    state_reason: str
    state_since: float
    accel: str | None


class Store:
    def __init__(self, path: Path) -> None:
        """Open (or create) the store at ``path`` and bring its schema up to date.

        Raises Refused, having changed nothing, when the file's schema is newer
        than this ferryd knows or the file is not a SQLite database."""
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        try:
            self._upgrade()
        except BaseException:
            self._db.close()
            raise
        self._db.execute("PRAGMA synchronous=NORMAL")

    def _upgrade(self) -> None:
        """Refuse a schema from a newer ferryd before writing anything; else run
        the missing steps, all in one transaction."""
        try:
            found = self._db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise Refused(f"ferry.db at {self.path} is not a SQLite database ({exc})",
                          path=str(self.path)) from exc
        if found > SCHEMA_VERSION:
            raise Refused(
                f"ferry.db at {self.path} has schema version {found}; this ferryd "
                f"({__version__}) knows up to {SCHEMA_VERSION}: upgrade ferryd",
                path=str(self.path), schema_version=found, known=SCHEMA_VERSION)
        self._db.execute("PRAGMA journal_mode=WAL")
        if found == SCHEMA_VERSION:
            return
        fresh = self._db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is None
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for step in UPGRADES[found:]:
                step(self._db)
            # the pragma takes no parameter; SCHEMA_VERSION is our own int
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        if fresh:
            log.info("ferry.db at %s: new, schema version %d", self.path, SCHEMA_VERSION)
        else:
            log.info("ferry.db at %s: schema version %d upgraded to %d", self.path, found,
                     SCHEMA_VERSION)

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

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

    def set_config(self, config: DomainConfig) -> None:
        """A defined domain's new configuration (same name and UUID)."""
        self._db.execute("UPDATE domains SET config=? WHERE name=?",
                         (config.model_dump_json(), config.name))

    def set_state(self, name: str, state: DomainState, reason: str,
                  accel: str | None = None) -> None:
        self._db.execute(
            "UPDATE domains SET state=?, state_reason=?, state_since=?, "
            "accel=COALESCE(?, accel) WHERE name=?",
            (state.value, reason, time.time(), accel, name))

    def delete(self, name: str) -> None:
        self._db.execute("DELETE FROM domains WHERE name=?", (name,))

    # -- migration records: the job as JSON, with the columns we query by ---------------
    def setting(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM host_settings WHERE key=?",
                               (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_setting(self, key: str, value: str | None) -> None:
        """Set (or, with None, clear) a host-wide setting."""
        if value is None:
            self._db.execute("DELETE FROM host_settings WHERE key=?", (key,))
        else:
            self._db.execute("INSERT INTO host_settings (key, value) VALUES (?, ?) ON "
                             "CONFLICT(key) DO UPDATE SET value=excluded.value",
                             (key, value))

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
