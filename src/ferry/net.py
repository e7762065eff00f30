"""Host networking for bridged NICs: tap devices on host bridges (pyroute2).

Each bridged NIC of a running domain is a tap that ferryd creates before QEMU
starts (QEMU opens it by name, ``script=no``), attaches to the NIC's bridge and
brings up; ferryd deletes it once that QEMU has exited — when the domain stops,
crashes, or has left for another host. Tap names are per host (see
``ferry.qemu.argv.tap_name``), so a domain's source and destination taps never
collide, even with two hosts in one network namespace.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ferry.errors import Failed

log = logging.getLogger(__name__)


def bridge_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}/bridge").is_dir()


def link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


@contextlib.contextmanager
def _ipr() -> Iterator[Any]:
    # imported here: pyroute2 costs ~20 MiB of ferryd's memory, and only hosts with
    # bridged domains need it
    from pyroute2 import IPRoute
    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _warn_if_floating(bridge: str) -> None:
    """A bridge whose address was never set takes its lowest port's: adding or
    removing ports may change the host's MAC under its neighbours' ARP caches."""
    try:
        kind = Path(f"/sys/class/net/{bridge}/addr_assign_type").read_text().strip()
    except OSError:
        return
    if kind != "3":  # NET_ADDR_SET
        log.warning("bridge %s has no fixed MAC address: it may change as taps come and "
                    "go; give it one (e.g. systemd-networkd does, or 'ip link set %s "
                    "address ...')", bridge, bridge)


def tap_mac(guest_mac: str) -> str:
    """The tap's own address: the guest's with the first byte 0xfe. A Linux bridge
    without a fixed address takes the lowest of its ports' addresses; a tap with
    a random one could lower it, changing the host's own MAC on the bridge under
    its neighbours' ARP caches. 0xfe.. never wins (libvirt does the same)."""
    return "fe" + guest_mac.lower()[2:]


def create_taps(taps: Sequence[tuple[str, str, str]]) -> None:
    """Create each (tap, bridge, guest MAC): a tap device, enslaved to the bridge,
    up. A leftover tap of that name is replaced. All or nothing: Failed, with none
    left."""
    if not taps:
        return
    from pyroute2 import NetlinkError
    made: list[str] = []
    try:
        with _ipr() as ipr:
            for tap, bridge, mac in taps:
                if link_exists(tap):
                    ipr.link("del", ifname=tap)
                found = ipr.link_lookup(ifname=bridge)
                if not found or not bridge_exists(bridge):
                    raise Failed(f"bridge {bridge} does not exist")
                ipr.link("add", ifname=tap, kind="tuntap", mode="tap")
                made.append(tap)
                idx = ipr.link_lookup(ifname=tap)[0]
                ipr.link("set", index=idx, address=tap_mac(mac))
                ipr.link("set", index=idx, master=found[0])
                ipr.link("set", index=idx, state="up")
                log.info("tap %s on bridge %s", tap, bridge)
                _warn_if_floating(bridge)
    except (NetlinkError, OSError) as exc:
        delete_taps(made)
        raise Failed(f"cannot create tap devices {[t[0] for t in taps]}: {exc}") from exc
    except Failed:
        delete_taps(made)
        raise


def delete_taps(taps: Sequence[str]) -> None:
    """Delete the taps that exist; never fails (logs what it could not do)."""
    if not any(link_exists(t) for t in taps):
        return
    from pyroute2 import NetlinkError
    with _ipr() as ipr:
        for tap in taps:
            if not link_exists(tap):
                continue
            try:
                ipr.link("del", ifname=tap)
                log.info("tap %s removed", tap)
            except NetlinkError as exc:
                log.warning("cannot remove tap %s: %s", tap, exc)
