"""Host resources as the kernel reports them (memory, process RSS), and the
arithmetic of how much memory is free for domains."""
from __future__ import annotations

from pathlib import Path


def meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB."""
    out: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0])
    return out


def rss_mib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0



def domain_memory_free(*, total: int, available: int, reserve: int, allocated: int,
                       untouched: int, reserved: int) -> int:
    """MiB a new domain may have; every argument in MiB.

    ``total``, ``available``: the host's MemTotal and MemAvailable. ``reserve``:
    what the host keeps for itself (``memory_reserve``). ``allocated``: the memory
    of the running domains; ``untouched``: the part of it they have not used yet
    (so it is still in ``available``). ``reserved``: promised to incoming
    migrations.

    Two bounds, the smaller wins, never below 0:

    - what is available now, less what running domains may still take and what
      is promised: ``available - untouched - reserved``;
    - the share of the host that is the domains', less what they and incoming
      migrations already have: ``total - reserve - allocated - reserved``.

    The reserve is not taken from ``available``: the host's own use is already
    out of it, and counting it again would leave nothing when the reserve is
    close to the total.
    """
    now = available - untouched - reserved
    share = total - reserve - allocated - reserved
    return max(0, min(now, share))
