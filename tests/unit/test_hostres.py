"""How much memory is free for a new domain: pure arithmetic, and its inputs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ferry import domains
from ferry.domains import Domain, DomainService
from ferry.events import EventBus
from ferry.hostconfig import HostConfig
from ferry.hostres import domain_memory_free
from ferry.models import DomainConfig, DomainState
from ferry.store import Store


def free(total: int = 16_000, available: int = 14_000, reserve: int = 512,
         allocated: int = 0, untouched: int = 0, reserved: int = 0) -> int:
    return domain_memory_free(total=total, available=available, reserve=reserve,
                              allocated=allocated, untouched=untouched, reserved=reserved)


def test_reserve_near_the_total_leaves_the_rest() -> None:
    """The reported case: reserve = MemTotal - 150 MiB, no domains: 150 MiB free,
    not 0 (the host's own use was counted twice, in MemAvailable and the reserve)."""
    assert free(total=16_000, available=14_000, reserve=16_000 - 150) == 150


def test_idle_host() -> None:
    assert free(total=4000, available=3900, reserve=512) == 3488  # total - reserve
    assert free(total=4000, available=1000, reserve=512) == 1000  # what is available


def test_running_domains() -> None:
    # 2 GiB allocated, 1.5 GiB of it not touched yet: it may still be taken
    assert free(total=16_000, available=8000, allocated=2048, untouched=1536) == 6464
    # the share bound counts all of it, touched or not
    assert free(total=4000, available=3900, allocated=2048, untouched=2000) == 1440


def test_incoming_reservations_count_in_both_bounds() -> None:
    assert free(total=16_000, available=4000, reserved=1000) == 3000
    assert free(total=4000, available=3900, reserved=1000) == 2488


def test_never_negative() -> None:
    assert free(total=4000, available=100, allocated=3000, untouched=2000) == 0
    assert free(total=4000, available=4000, reserve=5000) == 0


@dataclass
class FakeProc:
    pid: int


def test_domain_service_feeds_the_arithmetic(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Only domains with a QEMU count; their RSS says how much they touched."""
    host = HostConfig(state_dir=tmp_path, memory_reserve=1000)
    store = Store(tmp_path / "ferry.db")
    svc = DomainService(host, store, "tcg", EventBus())
    monkeypatch.setattr(domains, "meminfo",
                        lambda: {"MemTotal": 8000 * 1024, "MemAvailable": 6000 * 1024})
    monkeypatch.setattr(domains, "rss_mib", lambda pid: {1: 300, 2: 1200}[pid])

    def add(name: str, memory: int, pid: int | None) -> None:
        cfg = DomainConfig(name=name, memory=memory, kernel=Path("/k"))
        proc: Any = FakeProc(pid) if pid else None
        state = DomainState.running if pid else DomainState.shutoff
        svc.domains[name] = Domain(cfg, state, "", 0.0, proc=proc)

    assert svc.memory_free() == 6000  # min(6000, 8000 - 1000)
    add("a", 1000, 1)     # 700 untouched
    add("b", 1000, 2)     # RSS above its memory (QEMU's own): 0 untouched
    add("off", 4000, None)
    svc.reservations["0123456789ab"] = 500
    # min(6000 - 700 - 500, 8000 - 1000 - 2000 - 500)
    assert svc.memory_free() == 4500
    store.close()
