"""Bridged networking on a LAN of network namespaces (tests/netlab.py): two
hosts, each ferryd in its own namespace on its LAN address, a client on the
same LAN, and a guest bridged onto the hosts' br0 with a static address. What
the guest's users see is checked from the client's namespace."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import INITRD, KERNEL, Host, started, wait_for
from netlab import GUEST_IP, HOSTS, SUBNET, Lab

MAC = "52:54:00:77:00:50"
PORT = 7790
STREAMER = str(Path(__file__).resolve().parent / "streamer.py")
LAN_HOSTS: list[Host] = []  # for diagnostics when a migration hangs


@pytest.fixture(scope="module")
def lab(guest: Any) -> Iterator[Lab]:
    with Lab("fytest") as lab:
        yield lab


@pytest.fixture(scope="module")
def lan(lab: Lab, workdir: Path) -> Iterator[dict[str, Host]]:
    hosts = {
        f"n{h}": Host(workdir, f"n{h}", addr, netns=lab.ns(h), control_port=PORT,
                      storage_dirs=[str(workdir)], hosts_allow=[f"{SUBNET}.0/24"],
                      peers={f"n{o}": f"{oaddr}:{PORT}" for o, oaddr in HOSTS.items()
                             if o != h})
        for h, addr in HOSTS.items()}
    LAN_HOSTS[:] = hosts.values()
    with started(hosts):
        yield hosts


def lan_guest(name: str, bridge: str = "br0", mac: str = MAC) -> dict[str, Any]:
    return {"name": name, "memory": 256, "vcpus": 1, "accel": "tcg",
            "kernel": str(KERNEL), "initrd": str(INITRD),
            "cmdline": f"console=ttyS0 quiet ferry.ip={GUEST_IP}/24 ferry.tick=1",
            "nics": [{"mode": "bridge", "bridge": bridge, "mac": mac}]}


def taps(lab: Lab, host: str) -> list[str]:
    """Ferry's tap devices in host ``host``'s namespace."""
    out = lab.exec(host, "ip", "-o", "link", "show", "type", "tun").stdout
    return re.findall(r"^\d+: (fy[0-9a-f]+n\d+)", out, re.M)


def where(lan: dict[str, Host], name: str) -> list[str]:
    return [n for n, h in lan.items() if h.domains().get(name, {}).get("state") == "running"]


def migrate(host: Host, name: str, dest: str, *flags: str) -> dict[str, Any]:
    try:
        res = host.ferry("migrate", name, dest, *flags, "--json", check=False, timeout=90)
    except subprocess.TimeoutExpired:
        logs = {h.name: h.log.read_text()[-3000:] for h in LAN_HOSTS}
        raise AssertionError(f"migrate {name} to {dest} hung; ferryd logs: {logs}") from None
    return {**json.loads(res.stdout or "{}"), "_rc": res.returncode, "_err": res.stderr}


@pytest.fixture(scope="module")
def roamer(lab: Lab, lan: dict[str, Host]) -> Iterator[str]:
    """A guest on host na, bridged onto br0 as 10.77.0.50."""
    try:
        lan["na"].create(lan_guest("roamer"))
        wait_for(lambda: "FERRY-AGENT READY" in lan["na"].ferry(
            "console", "roamer", "--log").stdout, 60, "the guest")
        yield "roamer"
    finally:
        for h in lan.values():
            h.ferry("destroy", "roamer", check=False)
            h.ferry("undefine", "roamer", check=False)


@pytest.fixture
def at_home(lan: dict[str, Host], roamer: str) -> Iterator[str]:
    """The roamer, on host na before the test and brought back after it."""
    if where(lan, roamer) == ["nb"]:
        migrate(lan["nb"], roamer, "na", "--live")
    assert where(lan, roamer) == ["na"]
    yield roamer
    if where(lan, roamer) == ["nb"]:
        migrate(lan["nb"], roamer, "na", "--live")


class Stream:
    """tests/streamer.py in the client namespace, streaming through the guest."""

    def __init__(self, lab: Lab) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.client, sys.executable, STREAMER, GUEST_IP,
             "7777", "256"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        hello = self.proc.stdout.readline()
        assert json.loads(hello) == {"connected": True}, hello

    def finish(self) -> dict[str, Any]:
        """Stop sending (stdin closes), wait for the echo, return the verdict."""
        out, _ = self.proc.communicate(timeout=90)
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


class Ping:
    """ping from the client, every 20 ms, until stopped; then its loss."""

    def __init__(self, lab: Lab) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.client, "ping", "-n", "-i", "0.02", GUEST_IP],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> tuple[int, int]:
        """(sent, answered)."""
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=10)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert m, out
        return int(m.group(1)), int(m.group(2))


def test_tcp_stream_survives_live_a_b_a(lab: Lab, lan: dict[str, Host], at_home: str,
                                        record_property: Any) -> None:
    """A TCP connection from the client through the guest carries a checked byte
    stream both ways across live migrations A → B → A: nothing lost, duplicated or
    reordered; right after each switch-over the LAN switch sends the guest's MAC
    to its new host; the source's tap is gone. Ping loss is measured."""
    roamer = at_home
    stream, ping = Stream(lab), Ping(lab)
    try:
        time.sleep(1)
        for src, dst in (("na", "nb"), ("nb", "na")):
            job = migrate(lan[src], roamer, dst, "--live")
            # the LAN bridge already forwards to the new host's uplink
            port = lab.fdb_port(MAC)
            assert job["state"] == "completed", job
            assert port == f"lan-{dst[1]}", port
            assert where(lan, roamer) == [dst]
            assert taps(lab, src[1]) == [] and len(taps(lab, dst[1])) == 1
            time.sleep(1.5)
        sent, answered = ping.stop()
        result = stream.finish()
    finally:
        stream.kill()
        if ping.proc.poll() is None:
            ping.proc.kill()
            ping.proc.communicate()
    print(f"stream: {result}; ping: {sent - answered} of {sent} lost over two live hops")
    record_property("ping_lost", sent - answered)
    record_property("ping_sent", sent)
    assert result["error"] is None, result
    assert result["mismatch"] is None, result
    assert result["received"] == result["sent"] > 256 * 1024
    assert answered > 0


def test_announce_moves_a_quiet_guests_mac(lab: Lab, lan: dict[str, Host],
                                           at_home: str) -> None:
    """With no traffic to or from the guest, only the destination's announce can
    tell the LAN where the guest went: the switch knows as soon as migrate returns."""
    roamer = at_home
    time.sleep(1)  # let the last stream's frames drain
    for src, dst in (("na", "nb"), ("nb", "na")):
        assert lab.fdb_port(MAC) == f"lan-{src[1]}"
        assert migrate(lan[src], roamer, dst, "--live")["state"] == "completed"
        assert lab.fdb_port(MAC) == f"lan-{dst[1]}"


def test_offline_migration_keeps_the_connection(lab: Lab, lan: dict[str, Host],
                                                at_home: str) -> None:
    """Offline, the guest is paused while its memory is copied; TCP retransmits
    across the pause and the connection goes on from host B."""
    roamer = at_home
    stream = Stream(lab)
    try:
        time.sleep(1)
        job = migrate(lan["na"], roamer, "nb")
        assert job["state"] == "completed" and job["mode"] == "offline", job
        assert lab.fdb_port(MAC) == "lan-b"
        time.sleep(2)
        result = stream.finish()
    finally:
        stream.kill()
    print(f"stream across an offline hop: {result}")
    assert result["error"] is None and result["mismatch"] is None, result
    assert result["received"] == result["sent"] > 0


def test_destination_without_the_bridge_is_refused(lab: Lab, lan: dict[str, Host],
                                                   workdir: Path) -> None:
    """A NIC on a bridge host nb doesn't have: refused, naming the bridge; the
    guest keeps running on na, nb has nothing new, no tap is left anywhere."""
    lab.exec("a", "ip", "link", "add", "brx", "type", "bridge")
    lab.exec("a", "ip", "link", "set", "brx", "up")
    others = set(taps(lab, "a"))
    try:
        lan["na"].create(lan_guest("stayer", bridge="brx", mac="52:54:00:77:00:51"))
        mine = set(taps(lab, "a")) - others
        assert len(mine) == 1
        assert mine <= set(lab.exec("a", "ip", "-o", "link", "show", "master", "brx")
                           .stdout.replace(":", " ").split())
        before_b = (lan["nb"].domains(), lan["nb"].qemu_pids(), taps(lab, "b"))
        job = migrate(lan["na"], "stayer", "nb", "--live")
        assert job["_rc"] == 1 and job["state"] == "failed", job
        assert "bridge brx does not exist on host nb" in job["error"]["message"]
        assert where(lan, "stayer") == ["na"]
        assert (lan["nb"].domains(), lan["nb"].qemu_pids(), taps(lab, "b")) == before_b
        check = lan["na"].ferry("migrate", "stayer", "nb", "--check", check=False)
        assert check.returncode == 1 and "bridge brx" in check.stdout
    finally:
        lan["na"].ferry("destroy", "stayer", check=False)
        lan["na"].ferry("undefine", "stayer", check=False)
        lab.exec("a", "ip", "link", "del", "brx", check=False)
    # destroying the domain removed its tap
    assert not mine & set(taps(lab, "a"))


def test_taps_of_a_guest_that_died_with_ferryd_down_are_removed(
        lab: Lab, lan: dict[str, Host]) -> None:
    """QEMU killed while ferryd is down: the restarted ferryd marks the domain
    crashed and removes its tap."""
    na = lan["na"]
    before = set(taps(lab, "a"))
    na.create(lan_guest("ghost", mac="52:54:00:77:00:52"))
    try:
        mine = set(taps(lab, "a")) - before
        assert len(mine) == 1
        pid = na.domains()["ghost"]["pid"]
        na.kill9()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{pid}").exists()
                 or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2], 10, "QEMU")
        assert mine <= set(taps(lab, "a"))  # nobody removed it yet
        na.start()
        assert na.domains()["ghost"]["state"] == "crashed"
        assert not mine & set(taps(lab, "a"))
    finally:
        if na.proc is None:
            na.start()
        na.ferry("destroy", "ghost", check=False)
        na.ferry("undefine", "ghost", check=False)
