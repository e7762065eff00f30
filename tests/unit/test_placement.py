"""Placement: largest first, each to the host with the most memory free after
the moves already planned; what fits nowhere stays, with why."""
from __future__ import annotations

from ferry.fleet.placement import Candidate, Moving, place

HOSTS = [Candidate("b", 3000), Candidate("c", 2000)]


def moving(name: str, mib: int, allowed: str = "bc", **refused: str) -> Moving:
    return Moving(name, mib, frozenset(allowed), refused)


def test_largest_first_to_the_most_free_after_planned_moves() -> None:
    plan = place([moving("small", 500), moving("big", 2000), moving("mid", 1000)], HOSTS)
    # big → b (3000 → 1000 left); mid → c (2000 → 1000); small → b (tie: by name)
    assert plan.moves == {"big": "b", "mid": "c", "small": "b"} and plan.stays == {}


def test_what_fits_nowhere_stays_with_the_reasons() -> None:
    plan = place([moving("huge", 5000), moving("picky", 100, "c", b="machine type pc")],
                 HOSTS)
    assert plan.moves == {"picky": "c"}
    assert "b: 3000 MiB free" in plan.stays["huge"] and "needs 5000 MiB" in plan.stays["huge"]
    plan = place([moving("lonely", 100, "", b="maintenance", c="unreachable")], HOSTS)
    assert plan.stays == {"lonely": "b: maintenance; c: unreachable"}
    assert place([moving("x", 1, "")], []).stays == {"x": "no other host to go to"}


def test_the_plan_is_the_same_every_time() -> None:
    doms = [moving(f"d{i}", 100 * (i % 3 + 1)) for i in range(9)]
    assert place(doms, HOSTS) == place(list(reversed(doms)), list(reversed(HOSTS)))
