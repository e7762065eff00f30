"""The store's schema version (PRAGMA user_version): pure SQLite in tmp_path."""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from ferry import __version__, daemon, store
from ferry.errors import Refused
from ferry.models import DomainConfig, DomainState
from ferry.store import SCHEMA_VERSION, Store

CONFIG = DomainConfig.model_validate({"name": "a", "memory": 64, "kernel": "/k"})

# the tables as ferryd made them before the schema had a version
DOMAINS_V0 = """CREATE TABLE domains (name TEXT PRIMARY KEY, uuid TEXT NOT NULL UNIQUE,
    config TEXT NOT NULL, state TEXT NOT NULL, state_reason TEXT NOT NULL DEFAULT '',
    state_since REAL NOT NULL, accel TEXT)"""
MIGRATIONS_V0 = """CREATE TABLE migrations (id TEXT NOT NULL, role TEXT NOT NULL,
    domain TEXT NOT NULL, state TEXT NOT NULL, started REAL NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (id, role))"""


def make_db(path: Path, *statements: str, user_version: int = 0) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    for statement in statements:
        db.execute(statement)
    db.execute(f"PRAGMA user_version = {user_version}")
    db.commit()
    db.close()


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def test_current_schema_is_2() -> None:
    assert SCHEMA_VERSION == 2


def test_new_db_gets_the_current_version(tmp_path: Path) -> None:
    path = tmp_path / "ferry.db"
    st = Store(path)
    assert st.schema_version == SCHEMA_VERSION
    st.insert(CONFIG, DomainState.shutoff)
    st.close()
    assert user_version(path) == SCHEMA_VERSION
    assert tables(path) == {"domains", "migrations", "host_settings"}
    again = Store(path)  # opening a current db changes nothing
    rec = again.get("a")
    assert rec is not None and rec.config == CONFIG
    again.close()


@pytest.mark.parametrize("statements", [(DOMAINS_V0, MIGRATIONS_V0), (DOMAINS_V0,)],
                         ids=["with-migrations", "before-migrations"])
def test_unversioned_db_of_an_older_ferryd_is_upgraded(tmp_path: Path,
                                                       statements: tuple[str, ...]) -> None:
    path = tmp_path / "ferry.db"
    make_db(path, *statements,
            "INSERT INTO domains (name, uuid, config, state, state_since) VALUES "
            f"('a', '{CONFIG.uuid}', '{CONFIG.model_dump_json()}', 'shutoff', 1.0)")
    st = Store(path)
    assert st.schema_version == SCHEMA_VERSION
    rec = st.get("a")
    assert rec is not None and rec.config == CONFIG and rec.state_since == 1.0
    assert st.migrations() == []
    st.close()
    assert tables(path) == {"domains", "migrations", "host_settings"}


def test_newer_schema_is_refused_without_touching_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ferry.db"
    make_db(path, DOMAINS_V0, "CREATE TABLE future (x)", user_version=7)
    before, listing = path.read_bytes(), sorted(os.listdir(tmp_path))
    with pytest.raises(Refused) as exc:
        Store(path)
    assert exc.value.message == (
        f"ferry.db at {path} has schema version 7; this ferryd ({__version__}) knows up "
        "to 2: upgrade ferryd")
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == listing
    assert user_version(path) == 7


def test_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ferry.db"
    path.write_bytes(b"this is no SQLite file" * 100)
    with pytest.raises(Refused, match="is not a SQLite database"):
        Store(path)


def test_steps_run_in_order_from_the_stored_version(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """How a later schema change goes: a next step runs on a current db only."""
    ran: list[str] = []

    def to_v3(db: sqlite3.Connection) -> None:
        ran.append("v3")
        db.execute("ALTER TABLE domains ADD COLUMN host TEXT")

    path = tmp_path / "ferry.db"
    Store(path).close()  # the current version
    monkeypatch.setattr(store, "UPGRADES", (*store.UPGRADES, to_v3))
    monkeypatch.setattr(store, "SCHEMA_VERSION", 3)
    Store(path).close()
    Store(path).close()
    assert ran == ["v3"] and user_version(path) == 3


def test_a_failed_step_leaves_the_db_as_it_was(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE half (x)")
        raise RuntimeError("step failed")

    path = tmp_path / "ferry.db"
    make_db(path, DOMAINS_V0)
    monkeypatch.setattr(store, "UPGRADES", (*store.UPGRADES, broken))
    monkeypatch.setattr(store, "SCHEMA_VERSION", 3)
    with pytest.raises(RuntimeError, match="step failed"):
        Store(path)
    assert user_version(path) == 0 and tables(path) == {"domains"}


def test_ferryd_exits_on_a_newer_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ferry.db"
    make_db(path, DOMAINS_V0, user_version=7)
    before = path.read_bytes()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(SystemExit) as exc:
        daemon.main(["--state-dir", str(tmp_path), "--name", "h", "--accel", "tcg"])
    assert exc.value.code == (f"ferryd: ferry.db at {path} has schema version 7; this "
                              f"ferryd ({__version__}) knows up to 2: upgrade ferryd")
    assert path.read_bytes() == before


def test_host_settings_persist(tmp_path: Path) -> None:
    st = Store(tmp_path / "ferry.db")
    assert st.setting("maintenance") is None
    st.set_setting("maintenance", "on")
    st.close()
    st = Store(tmp_path / "ferry.db")
    assert st.setting("maintenance") == "on"
    st.set_setting("maintenance", None)
    assert st.setting("maintenance") is None
    st.close()
