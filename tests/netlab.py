"""A two-host LAN on one machine, made of network namespaces.

    <prefix>-lan   bridge lan0 — the "switch"; ports lan-a, lan-b, lan-c
    <prefix>-a     host A: bridge br0 (10.77.0.1/24) with uplink up-a ↔ lan-a
    <prefix>-b     host B: bridge br0 (10.77.0.2/24) with uplink up-b ↔ lan-b
    <prefix>-c     a client: up-c (10.77.0.100/24) ↔ lan-c

ferryd runs inside <prefix>-a and <prefix>-b on their LAN addresses; a guest
bridged onto br0 sits on the same layer-2 segment as the client, with a static
address (GUEST_IP). Nothing here touches the machine's own namespace except
creating and deleting the namespaces themselves.

Developers: ``bash scripts/netlab.sh up`` builds it (``down`` removes it);
``ip netns exec fylab-c ping 10.77.0.1`` and so on. Tests use ``Lab`` as a
context manager, which removes everything also when the test fails.
"""
from __future__ import annotations

import subprocess
import sys
from types import TracebackType

SUBNET = "10.77.0"
HOSTS = {"a": f"{SUBNET}.1", "b": f"{SUBNET}.2"}
CLIENT_IP = f"{SUBNET}.100"
GUEST_IP = f"{SUBNET}.50"


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(args, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {res.stderr.strip()}")
    return res


class Lab:
    def __init__(self, prefix: str = "fylab") -> None:
        self.prefix = prefix
        self.lan = f"{prefix}-lan"
        self.client = f"{prefix}-c"

    def ns(self, host: str) -> str:
        """The namespace of host ``a``/``b`` (or ``c``, the client, ``lan``)."""
        return f"{self.prefix}-{host}"

    def namespaces(self) -> list[str]:
        return [self.lan, *(self.ns(h) for h in HOSTS), self.client]

    def exec(self, host: str, *args: str, check: bool = True
             ) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.ns(host), *args, check=check)

    def up(self) -> Lab:
        self.down()  # whatever an earlier run left behind
        try:
            for ns in self.namespaces():
                run("ip", "netns", "add", ns)
                run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", self.lan, "link", "add", "lan0", "type", "bridge",
                "forward_delay", "0", "stp_state", "0")
            run("ip", "-n", self.lan, "link", "set", "lan0", "up")
            for h in (*HOSTS, "c"):
                run("ip", "link", "add", f"up-{h}", "netns", self.ns(h), "type", "veth",
                    "peer", "name", f"lan-{h}", "netns", self.lan)
                run("ip", "-n", self.lan, "link", "set", f"lan-{h}", "master", "lan0", "up")
            for i, (h, addr) in enumerate(HOSTS.items(), start=1):
                ns = self.ns(h)
                # a fixed address: a bridge without one takes its lowest port's,
                # which changes as guests' taps come and go, and the host's
                # neighbours' ARP caches go stale (Ferry's fe:... taps make that
                # rare, but a random veth address can be higher still)
                run("ip", "-n", ns, "link", "add", "br0", "address", f"02:77:00:00:00:{i:02x}",
                    "type", "bridge", "forward_delay", "0", "stp_state", "0")
                run("ip", "-n", ns, "link", "set", f"up-{h}", "master", "br0", "up")
                run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "br0")
                run("ip", "-n", ns, "link", "set", "br0", "up")
            run("ip", "-n", self.client, "addr", "add", f"{CLIENT_IP}/24", "dev", "up-c")
            run("ip", "-n", self.client, "link", "set", "up-c", "up")
        except Exception:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Delete the namespaces (their links and bridges go with them). Processes
        still inside are the caller's to stop first."""
        for ns in self.namespaces():
            run("ip", "netns", "del", ns, check=False)

    def fdb_port(self, mac: str) -> str | None:
        """The LAN bridge port that ``mac`` was last seen on, or None."""
        out = run("bridge", "-n", self.lan, "fdb", "show", "br", "lan0").stdout
        for line in out.splitlines():
            parts = line.split()
            if parts and parts[0].lower() == mac.lower() and "dev" in parts:
                return parts[parts.index("dev") + 1]
        return None

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("up", "down", "status"):
        sys.exit("usage: netlab.py up|down|status [PREFIX]")
    lab = Lab(sys.argv[2] if len(sys.argv) > 2 else "fylab")
    if sys.argv[1] == "up":
        lab.up()
        print(f"namespaces: {', '.join(lab.namespaces())}")
        for h, addr in HOSTS.items():
            print(f"host {h}: ip netns exec {lab.ns(h)} ...  (br0 {addr}/24)")
        print(f"client: ip netns exec {lab.client} ...  ({CLIENT_IP}/24); "
              f"guest address for tries: {GUEST_IP}")
        print(f"remove with: {sys.argv[0]} down {lab.prefix}")
    elif sys.argv[1] == "down":
        lab.down()
    else:
        have = run("ip", "netns", "list").stdout
        for ns in lab.namespaces():
            print(ns, "present" if ns in have else "absent")


if __name__ == "__main__":
    main()
