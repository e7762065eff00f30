"""The fleet, for real: three ferryd hosts on 127.0.0.1-3 with real guests —
host evacuation as placement plans it, and the limits on migrations a host runs."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import Host, Probe, free_port, guest_config, peer_hosts, started, wait_for

ADDRS = {"ea": "127.0.0.1", "eb": "127.0.0.2", "ec": "127.0.0.3"}
# memory each host offers its domains: ferryd's memory_free is at most
# total - memory_reserve - allocated, so the reserve sets it
OFFER = {"ea": 4096, "eb": 700, "ec": 450}


def mem_total_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


class Fleet:
    def __init__(self, root: Path) -> None:
        total = mem_total_mib()
        # eb runs one outgoing migration at a time (the queue's test)
        self.hosts = peer_hosts(root, ADDRS, {n: {"memory_reserve": total - OFFER[n],
                                                  **({"limits": {"outgoing": 1}}
                                                     if n == "eb" else {})}
                                              for n in ADDRS})

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def where(self, domain: str) -> list[str]:
        return [n for n, h in self.hosts.items()
                if h.domains().get(domain, {}).get("state") == "running"]


@pytest.fixture(scope="module")
def fleet(guest: Any, workdir: Path) -> Iterator[Fleet]:
    f = Fleet(workdir)
    with started(f.hosts):
        yield f


def boot(fleet: Fleet, host: str, name: str, memory: int, fill: int) -> Probe:
    port = free_port()
    fleet[host].create(guest_config(name, port, bind="", memory=memory,
                                    cmdline_extra=f"ferry.mem={fill}"))
    return Probe(port, *ADDRS.values())


def remove(fleet: Fleet, *names: str) -> None:
    for h in fleet.hosts.values():
        present = h.domains()
        for name in names:
            if name in present:
                h.ferry("destroy", name, check=False)
                h.ferry("undefine", name, check=False)


def test_evacuating_a_host_moves_each_domain_where_placement_says(fleet: Fleet) -> None:
    """ea holds three guests of different sizes and one that fits nowhere; the dry
    run shows the plan and changes nothing; the evacuation moves the three as
    planned (largest first, to the host with the most memory free after the moves
    planned), each guest's memory intact; the big one stays, with its reason;
    ea is in maintenance mode and refuses an incoming migration."""
    sizes = {"big": 256, "mid": 192, "small": 128, "huge": 800}
    probes = {n: boot(fleet, "ea", n, m, 32) for n, m in sizes.items()}
    try:
        before = {n: p.wait_up() for n, p in probes.items()}
        ea = fleet["ea"]
        dry = json.loads(ea.ferry("host", "evacuate", "--dry-run", "--json").stdout)
        # eb 700, ec 450: big -> eb (444 left), mid -> ec (258), small -> eb (316)
        expected = {"big": "eb", "mid": "ec", "small": "eb"}
        assert {m["domain"]: m["dest"] for m in dry["moves"]
                if m["state"] == "planned"} == expected, dry
        stays = {m["domain"]: m["reason"] for m in dry["moves"] if m["state"] == "stays"}
        assert set(stays) == {"huge"} and "800 MiB" in stays["huge"], stays
        assert [m["domain"] for m in dry["moves"]][:3] == ["big", "mid", "small"]
        assert ea.json("host")["maintenance"] is False   # a dry run changes nothing
        assert fleet.where("big") == ["ea"]

        res = ea.ferry("host", "evacuate", "--json", check=False, timeout=600)
        assert res.returncode == 1, res.stderr   # (huge is left here)
        evac = json.loads(res.stdout)
        moved = {m["domain"]: m for m in evac["moves"]}
        assert {n: m["dest"] for n, m in moved.items() if m["state"] == "completed"} \
            == expected, evac
        assert moved["huge"]["state"] == "stays" and "800 MiB" in moved["huge"]["reason"]
        for name, dest in expected.items():
            assert fleet.where(name) == [dest]
            job = fleet[dest].json("job", "show", moved[name]["job"])
            assert job["state"] == "completed" and job["mode"] == "live", job
            reply = probes[name].wait_up(10)
            assert probes[name].last_from == ADDRS[dest]
            assert reply["boot_id"] == before[name]["boot_id"], f"{name} rebooted"
            assert reply["corrupt"] == "0", f"{name}'s memory changed"
        assert fleet.where("huge") == ["ea"]
        assert ea.json("host")["maintenance"] is True
        # in maintenance, ea takes no migration in
        back = fleet["eb"].ferry("migrate", "small", "ea", "--live", check=False)
        assert back.returncode == 1 and "maintenance mode" in back.stderr, back.stderr
        assert fleet.where("small") == ["eb"]
        # the last evacuation can be looked at again
        status = json.loads(ea.ferry("host", "evacuate", "--status", "--json",
                                     check=False).stdout)
        assert status["id"] == evac["id"] and status["state"] == "done"
    finally:
        fleet["ea"].ferry("host", "maintenance", "off", check=False)
        for p in probes.values():
            p.close()
        remove(fleet, *sizes)


def test_evacuate_refuses_an_unknown_destination_and_changes_nothing(fleet: Fleet) -> None:
    ea = fleet["ea"]
    res = ea.ferry("host", "evacuate", "--to", "nosuch", check=False)
    assert res.returncode == 1 and "nosuch" in res.stderr and "eb" in res.stderr, res.stderr
    assert ea.json("host")["maintenance"] is False
    res = ea.ferry("host", "evacuate", "--parallel", "0", check=False)
    assert res.returncode == 2, res.stderr
    assert ea.json("host")["maintenance"] is False


def test_the_pinned_machine_type_survives_three_hops(fleet: Fleet) -> None:
    """Defined as `q35`, the domain is pinned at its first start to the
    versioned type this QEMU resolves q35 to, and keeps it across three live
    hops (each destination's QEMU runs that very type)."""
    from ferry.qemu.probe import machine_aliases
    pinned = machine_aliases("qemu-system-x86_64")["q35"]
    assert pinned.startswith("pc-q35-")
    probe = boot(fleet, "ea", "pinned", 128, 16)
    try:
        first = probe.wait_up()
        assert fleet["ea"].json("info", "pinned")["config"]["machine"] == pinned
        for src, dst in (("ea", "eb"), ("eb", "ec"), ("ec", "ea")):
            res = fleet[src].ferry("migrate", "pinned", dst, "--live", "--json")
            assert json.loads(res.stdout)["state"] == "completed"
            assert fleet[dst].json("info", "pinned")["config"]["machine"] == pinned
            pid = fleet[dst].json("info", "pinned")["pid"]
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert cmd[cmd.index(b"-machine") + 1].split(b",")[0] == pinned.encode()
        reply = probe.wait_up(10)
        assert reply["boot_id"] == first["boot_id"] and reply["corrupt"] == "0"
    finally:
        probe.close()
        remove(fleet, "pinned")


def test_a_migration_beyond_the_hosts_limit_queues_and_starts_when_one_ends(
        fleet: Fleet) -> None:
    """eb runs at most one outgoing migration ([limits] outgoing = 1): of two
    started at once, the second shows as queued until the first has ended,
    then runs and completes; both guests intact."""
    eb = fleet["eb"]
    probes = {n: boot(fleet, "eb", n, 128, 48) for n in ("first", "second")}
    try:
        before = {n: p.wait_up() for n, p in probes.items()}
        # a cap keeps the first one going for a few seconds
        one = json.loads(eb.ferry("migrate", "first", "ec", "--live", "--bandwidth", "16",
                                  "--detach", "--json").stdout)
        two = json.loads(eb.ferry("migrate", "second", "ec", "--live", "--detach",
                                  "--json").stdout)
        queued = eb.json("job", "show", two["id"])
        assert queued["queued"] and "at most 1 outgoing" in queued["queued"], queued
        assert queued["phase"] == "begin"
        assert "queued" in eb.ferry("jobs").stdout
        assert eb.json("job", "show", one["id"])["state"] == "running"
        eb.ferry("job", "set", one["id"], "--bandwidth", "0")   # (seen: now be quick)
        done = wait_for(lambda: (r := eb.json("job", "show", two["id"]))["state"] != "running"
                        and r, 300, "the second job to end")
        first = eb.json("job", "show", one["id"])
        assert first["state"] == "completed" and done["state"] == "completed", (first, done)
        # it went on only once the first had ended
        assert done["escalations"][0]["action"] == "queued"
        assert done["started"] + done["phase_times"]["queued"] >= first["ended"] - 0.5, \
            (first, done)
        for name, p in probes.items():
            assert fleet.where(name) == ["ec"]
            reply = p.wait_up(10)
            assert reply["boot_id"] == before[name]["boot_id"] and reply["corrupt"] == "0"
    finally:
        for p in probes.values():
            p.close()
        remove(fleet, *probes)
