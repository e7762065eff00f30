"""The fleet, for real: three ferryd hosts on 127.0.0.1–3 with real guests —
host evacuation as placement plans it, and the limits on migrations a host runs."""
from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import Host, Probe, free_port, guest_config

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
        ports = {n: free_port(socket.SOCK_STREAM, a) for n, a in ADDRS.items()}
        total = mem_total_mib()
        self.hosts = {
            n: Host(root, n, a, control_port=ports[n], storage_dirs=[str(root)],
                    memory_reserve=total - OFFER[n],
                    peers={p: f"{ADDRS[p]}:{ports[p]}" for p in ADDRS if p != n})
            for n, a in ADDRS.items()}

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def where(self, domain: str) -> list[str]:
        return [n for n, h in self.hosts.items()
                if h.domains().get(domain, {}).get("state") == "running"]


@pytest.fixture(scope="module")
def fleet(guest: Any, workdir: Path) -> Iterator[Fleet]:
    f = Fleet(workdir)
    try:
        for h in f.hosts.values():
            h.start()
        yield f
    finally:
        for h in f.hosts.values():
            h.cleanup()


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
