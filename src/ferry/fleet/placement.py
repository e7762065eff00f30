"""Where domains go: a pure function of what each candidate host has free and
which of them passed each domain's pre-flight check.

Largest domain first, each to the host that has the most memory free after the
moves already planned (ties: by name, so the plan is the same every time); a
domain that fits nowhere stays, with the reason. Used by ``ferry migrate
--auto`` (one domain) and host evacuation (all of a host's domains).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    name: str
    free_mib: int                       # memory free for domains now


@dataclass(frozen=True)
class Moving:
    name: str
    memory_mib: int
    # candidates whose pre-flight check passed for this domain; a candidate
    # missing here was refused (the reason in ``refused``)
    allowed: frozenset[str]
    refused: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Placement:
    moves: dict[str, str]               # domain -> host
    stays: dict[str, str]               # domain -> why it fits nowhere


def place(domains: list[Moving], hosts: list[Candidate]) -> Placement:
    free = {h.name: h.free_mib for h in hosts}
    moves: dict[str, str] = {}
    stays: dict[str, str] = {}
    for dom in sorted(domains, key=lambda d: (-d.memory_mib, d.name)):
        fits = [h for h in sorted(free) if h in dom.allowed and free[h] >= dom.memory_mib]
        if not fits:
            why = [f"{h}: {r}" for h, r in sorted(dom.refused.items())]
            why += [f"{h}: {free[h]} MiB free after the moves planned, it needs "
                    f"{dom.memory_mib} MiB" for h in sorted(free)
                    if h in dom.allowed and free[h] < dom.memory_mib]
            stays[dom.name] = "; ".join(why) or "no other host to go to"
            continue
        best = max(fits, key=lambda h: (free[h], -sorted(free).index(h)))
        moves[dom.name] = best
        free[best] -= dom.memory_mib
    return Placement(moves, stays)
