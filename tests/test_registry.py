"""The registry interface (ferry.ownership) against both backends: embedded
(two hosts that ask each other) and etcd (a real etcd on loopback). The same
tests run on each; the lease's expiry is etcd's own."""
from __future__ import annotations

import asyncio
import uuid as uuidlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from etcdlab import Etcd
from ferry.errors import Busy, Conflict, Failed
from ferry.fleet.registry import EmbeddedRegistry, EtcdRegistry
from ferry.hostconfig import ClusterSettings
from ferry.ownership import RegistryUnavailable


@pytest.fixture(scope="module")
def etcd() -> Iterator[Etcd]:
    e = Etcd()
    try:
        e.start()
        yield e
    finally:
        e.cleanup()


class EmbeddedPair:
    """Two hosts' embedded registries; each host's domains are what it claimed
    (as its own database would hold them)."""

    def __init__(self) -> None:
        self.local: dict[str, dict[str, str]] = {"h1": {}, "h2": {}}

    def registry(self, host: str) -> Any:
        other = "h2" if host == "h1" else "h1"

        async def peers() -> tuple[list[tuple[str, str, str]], list[str]]:
            return [(other, n, u) for n, u in self.local[other].items()], []

        reg = EmbeddedRegistry(host, lambda: list(self.local[host].items()), peers)
        claim = reg.claim

        async def claim_and_store(name: str, uuid: str) -> bool:
            took = await claim(name, uuid)
            self.local[host][name] = uuid
            return took

        reg.claim = claim_and_store  # type: ignore[method-assign]
        return reg


@pytest.fixture(params=["embedded", "etcd"])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Any, Any]]:
    if request.param == "embedded":
        both = EmbeddedPair()
        yield both.registry("h1"), both.registry("h2")
        return
    etcd: Etcd = request.getfixturevalue("etcd")
    prefix = f"/t{uuidlib.uuid4().hex[:8]}"   # each test its own part of the keyspace
    settings = ClusterSettings(backend="etcd", endpoints=[etcd.endpoint], prefix=prefix,
                               lock_ttl_s=2)
    regs = EtcdRegistry("h1", settings), EtcdRegistry("h2", settings)
    try:
        yield regs
    finally:
        for r in regs:
            await r.close()


def new_uuid() -> str:
    return str(uuidlib.uuid4())


async def test_a_name_or_uuid_another_host_owns_is_refused(pair: tuple[Any, Any]) -> None:
    h1, h2 = pair
    u = new_uuid()
    assert await h1.claim("web", u) is (h1.backend == "etcd")   # (took it)
    with pytest.raises(Conflict, match="h1"):
        await h2.claim("web", new_uuid())
    with pytest.raises(Conflict, match=u):
        await h2.claim("other", u)
    assert await h1.claim("web", u) is False   # the owner claiming again: fine
    assert await h2.owner("web") == "h1"
    await h2.claim("db", new_uuid())
    assert await h1.owner("db") == "h2"


async def test_a_migration_commits_from_the_source_to_the_destination(
        pair: tuple[Any, Any]) -> None:
    h1, h2 = pair
    u = new_uuid()
    await h1.claim("web", u)
    await h1.lock("web", u, "job1")
    await h2.commit("web", u, "h1", "h2", "job1")
    await h1.unlock("web", "job1")
    if h1.backend == "etcd":  # (embedded: each host's own database says)
        assert await h1.owner("web") == "h2"


async def test_etcd_commit_only_while_the_source_owns_and_holds_the_lock(
        etcd: Etcd) -> None:
    settings = ClusterSettings(backend="etcd", endpoints=[etcd.endpoint],
                               prefix=f"/t{uuidlib.uuid4().hex[:8]}", lock_ttl_s=2)
    h1, h2, h3 = (EtcdRegistry(h, settings) for h in ("h1", "h2", "h3"))
    try:
        u = new_uuid()
        await h1.claim("web", u)
        with pytest.raises(Failed, match="no longer holds the job's lock"):
            await h2.commit("web", u, "h1", "h2", "job1")   # no lock: refused
        assert await h1.owner("web") == "h1"
        await h1.lock("web", u, "job1")
        with pytest.raises(Busy, match="job1"):
            await h1.lock("web", u, "job2")           # one job at a time
        with pytest.raises(Conflict, match="owned by host h1"):
            await h3.lock("web", u, "job3")           # only the owner migrates it
        await h2.commit("web", u, "h1", "h2", "job1")
        assert await h3.owner("web") == "h2"
        await h2.commit("web", u, "h1", "h2", "job1")   # (again, by the same job: fine)
        with pytest.raises(Failed, match="h2 owns it"):
            await h3.commit("web", u, "h1", "h3", "job1")   # the swap happens once
        await h2.give_back("web", u, "h1", "h2")    # the guest failed to run on h2
        assert await h3.owner("web") == "h1"
        await h3.give_back("web", u, "h1", "h3")    # (names h1 now: nothing to give)
        assert await h3.owner("web") == "h1"
        await h1.unlock("web", "job1")
        await h1.lock("web", u, "job4")               # free again
        await h1.unlock("web", "job4")
        await h1.release("web", new_uuid())           # not its UUID: nothing removed
        assert await h2.owner("web") == "h1"
        await h1.release("web", u)
        assert await h2.owner("web") is None
        await h2.claim("web", u)                      # the name is free again
    finally:
        for r in (h1, h2, h3):
            await r.close()


async def test_etcd_lock_expires_when_its_holder_stops_refreshing(etcd: Etcd) -> None:
    """A source ferryd that dies stops refreshing its lease: within the TTL the
    lock is gone, and the destination's commit is refused."""
    settings = ClusterSettings(backend="etcd", endpoints=[etcd.endpoint],
                               prefix=f"/t{uuidlib.uuid4().hex[:8]}", lock_ttl_s=2)
    h1, h2 = EtcdRegistry("h1", settings), EtcdRegistry("h2", settings)
    try:
        u = new_uuid()
        await h1.claim("web", u)
        await h1.lock("web", u, "job1")
        for keeper in h1._keepers.values():   # as if its ferryd were killed
            keeper.cancel()
        await asyncio.sleep(3.5)
        with pytest.raises(Failed, match="lease expired"):
            await h2.commit("web", u, "h1", "h2", "job1")
        assert await h2.owner("web") == "h1"
        # a restarted h1 (no lease of its own for job1) may lock the domain again
        restarted = EtcdRegistry("h1", settings)
        try:
            await restarted.lock("web", u, "job2")
            await restarted.unlock("web", "job2")
        finally:
            await restarted.close()
    finally:
        await h1.close()
        await h2.close()


async def test_etcd_a_restarted_ferryd_takes_its_hosts_lock_over(etcd: Etcd) -> None:
    """A lock of this host's that no job of this ferryd holds (an earlier ferryd
    held it, or it is being released) does not keep the domain locked."""
    settings = ClusterSettings(backend="etcd", endpoints=[etcd.endpoint],
                               prefix=f"/t{uuidlib.uuid4().hex[:8]}", lock_ttl_s=30)
    before, after, other = (EtcdRegistry(h, settings) for h in ("h1", "h1", "h2"))
    try:
        u = new_uuid()
        await before.claim("web", u)
        await before.lock("web", u, "job1")
        await after.lock("web", u, "job2")
        await before.unlock("web", "job1")   # (its lease goes; the lock is job2's now)
        await other.commit("web", u, "h1", "h2", "job2")
        assert await other.owner("web") == "h2"
    finally:
        for r in (before, after, other):
            await r.close()


async def test_etcd_with_one_endpoint_down_the_next_answers(etcd: Etcd) -> None:
    import socket

    from helpers import free_port
    nobody = f"127.0.0.1:{free_port(socket.SOCK_STREAM)}"
    reg = EtcdRegistry("h1", ClusterSettings(backend="etcd", endpoints=[nobody, etcd.endpoint],
                                             prefix=f"/t{uuidlib.uuid4().hex[:8]}",
                                             timeout_s=1))
    try:
        assert await reg.claim("web", new_uuid()) is True
        assert await reg.owner("web") == "h1"
    finally:
        await reg.close()


async def test_etcd_away_refuses_clearly() -> None:
    import socket

    from helpers import free_port
    nobody = f"127.0.0.1:{free_port(socket.SOCK_STREAM)}"
    reg = EtcdRegistry("h1", ClusterSettings(backend="etcd", endpoints=[nobody],
                                             timeout_s=1))
    try:
        with pytest.raises(RegistryUnavailable, match="does not answer"):
            await reg.claim("web", new_uuid())
        with pytest.raises(RegistryUnavailable):
            await reg.lock("web", new_uuid(), "job1")
    finally:
        await reg.close()
