"""The etcd backend for real: two ferryd hosts on 127.0.0.1-2 sharing a real
etcd (Debian's etcd-server, started on loopback with a temporary data
directory) and real guests."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from etcdlab import Etcd
from ferry.fleet.registry import EtcdRegistry
from ferry.hostconfig import ClusterSettings
from helpers import Host, Probe, free_port, guest_config, peer_hosts, started, to_toml, wait_for

ADDRS = {"ka": "127.0.0.1", "kb": "127.0.0.2"}
TTL = 2


class EtcdFleet:
    def __init__(self, root: Path, etcd: Etcd) -> None:
        self.etcd = etcd
        self.hosts = peer_hosts(root, ADDRS, cluster={
            "backend": "etcd", "endpoints": [etcd.endpoint], "lock_ttl_s": TTL,
            "timeout_s": 2})
        self.settings = ClusterSettings(backend="etcd", endpoints=[etcd.endpoint])

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def owner(self, name: str) -> str | None:
        async def ask() -> str | None:
            reg = EtcdRegistry("test", self.settings)
            try:
                return await reg.owner(name)
            finally:
                await reg.close()
        return asyncio.run(ask())

    def lock(self, name: str) -> dict[str, Any] | None:
        async def ask() -> bytes | None:
            reg = EtcdRegistry("test", self.settings)
            try:
                return await reg._get(reg._lkey(name))
            finally:
                await reg.close()
        raw = asyncio.run(ask())
        return json.loads(raw) if raw else None


@pytest.fixture(scope="module")
def kfleet(guest: Any, workdir: Path) -> Iterator[EtcdFleet]:
    etcd = Etcd()
    try:
        etcd.start()
        f = EtcdFleet(workdir, etcd)
        with started(f.hosts):
            yield f
    finally:
        etcd.cleanup()


def boot(f: EtcdFleet, host: str, name: str) -> Probe:
    port = free_port()
    f[host].create(guest_config(name, port, bind="", memory=128,
                                cmdline_extra="ferry.mem=48"))
    return Probe(port, *ADDRS.values())


def remove(f: EtcdFleet, name: str) -> None:
    for h in f.hosts.values():
        if h.proc is not None and name in h.domains():
            h.ferry("destroy", name, check=False)
            h.ferry("undefine", name, check=False)


def test_a_name_owned_by_another_host_is_refused(kfleet: EtcdFleet, workdir: Path) -> None:
    path = workdir / "dup.toml"
    path.write_text(to_toml(guest_config("dup", free_port())))
    kfleet["ka"].ferry("define", str(path))
    try:
        assert kfleet.owner("dup") == "ka"
        res = kfleet["kb"].ferry("define", str(path), check=False)
        assert res.returncode == 1 and "owned by host ka" in res.stderr, res.stderr
        assert "dup" not in kfleet["kb"].domains()
        assert kfleet["kb"].json("host")["registry"] == "etcd"
    finally:
        kfleet["ka"].ferry("undefine", "dup")
    assert kfleet.owner("dup") is None     # undefine gives the name back
    kfleet["kb"].ferry("define", str(path))
    kfleet["kb"].ferry("undefine", "dup")


def test_the_owner_changes_at_the_commit_and_a_dead_sources_lock_expires(
        kfleet: EtcdFleet) -> None:
    """During a live migration the owner is still the source, which holds the
    job's lock; once the guest runs on the destination the owner is the
    destination and the lock is gone. Then a source ferryd killed mid-migration
    stops renewing its lease: the lock expires within its TTL and the guest
    stays where it was, owned there."""
    ka, kb = kfleet["ka"], kfleet["kb"]
    probe = boot(kfleet, "ka", "roam")
    try:
        first = probe.wait_up()
        assert kfleet.owner("roam") == "ka"
        job = json.loads(ka.ferry("migrate", "roam", "kb", "--live", "--bandwidth", "8",
                                  "--detach", "--json").stdout)
        wait_for(lambda: ka.json("job", "show", job["id"])["phase"] == "perform", 60,
                 "the job in perform")
        assert kfleet.owner("roam") == "ka"
        assert kfleet.lock("roam") == {"host": "ka", "job": job["id"]}
        ka.ferry("job", "set", job["id"], "--bandwidth", "0")   # (seen: now be quick)
        done = wait_for(lambda: (r := ka.json("job", "show", job["id"]))["state"]
                        != "running" and r, 300, "the job to end")
        assert done["state"] == "completed", done
        assert kfleet.owner("roam") == "kb"
        wait_for(lambda: kfleet.lock("roam") is None, 10, "the lock released")
        reply = probe.wait_up(10)
        assert reply["boot_id"] == first["boot_id"] and reply["corrupt"] == "0"

        # now from kb, whose ferryd dies in the middle
        job = json.loads(kb.ferry("migrate", "roam", "ka", "--live", "--bandwidth", "4",
                                  "--detach", "--json").stdout)
        wait_for(lambda: kb.json("job", "show", job["id"])["phase"] == "perform", 60,
                 "the second job in perform")
        assert kfleet.lock("roam") == {"host": "kb", "job": job["id"]}
        kb.kill9()
        t0 = time.monotonic()
        wait_for(lambda: kfleet.lock("roam") is None, TTL + 5, "the lease to expire")
        assert time.monotonic() - t0 < TTL + 5
        assert kfleet.owner("roam") == "kb"
        kb.start()
        rec = wait_for(lambda: (r := kb.json("job", "show", job["id"]))["state"]
                       != "running" and r, 60, "the job settled at restart")
        assert rec["state"] == "failed", rec
        assert kb.domains()["roam"]["state"] == "running"
        assert "roam" not in ka.domains()
        assert kfleet.owner("roam") == "kb"
        reply = probe.wait_up(10)
        assert probe.last_from == ADDRS["kb"] and reply["boot_id"] == first["boot_id"]
    finally:
        probe.close()
        remove(kfleet, "roam")


def test_with_etcd_stopped_migrate_and_define_are_refused_and_guests_run(
        kfleet: EtcdFleet, workdir: Path) -> None:
    ka = kfleet["ka"]
    probe = boot(kfleet, "ka", "steady")
    path = workdir / "newbie.toml"
    path.write_text(to_toml(guest_config("newbie", free_port())))
    try:
        first = probe.wait_up()
        kfleet.etcd.stop()
        try:
            res = ka.ferry("migrate", "steady", "kb", "--live", check=False)
            assert res.returncode == 1 and "registry" in res.stderr \
                and "does not answer" in res.stderr, res.stderr
            res = kfleet["kb"].ferry("define", str(path), check=False)
            assert res.returncode == 1 and "does not answer" in res.stderr, res.stderr
            assert "newbie" not in kfleet["kb"].domains()
            assert ka.json("jobs") == [] and kfleet["kb"].json("jobs") == []
            reply = probe.wait_up(10)
            assert reply["boot_id"] == first["boot_id"]
            assert ka.domains()["steady"]["state"] == "running"
        finally:
            kfleet.etcd.start()
        assert kfleet.owner("steady") == "ka"
    finally:
        probe.close()
        remove(kfleet, "steady")
