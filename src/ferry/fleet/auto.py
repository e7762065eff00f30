"""``ferry migrate NAME --auto``: the destination chosen like an evacuation
would: every reachable peer not in maintenance whose pre-flight check passes is
a candidate, and placement picks the one with the most memory free."""
from __future__ import annotations

from ferry.errors import Refused
from ferry.fleet.cluster import ClusterView
from ferry.fleet.placement import Candidate, Moving, place
from ferry.migration.models import MigrateRequest
from ferry.migration.source import MigrationService


async def choose_destination(cluster: ClusterView, mig: MigrationService, name: str,
                             req: MigrateRequest) -> str:
    """The peer ``name`` should go to; Refused, with every host's reason, if none."""
    dom = mig.domains.get(name)
    own = [b.message for b in mig.begin_blockers(dom, req)]
    if own:  # (this host's own reasons, not every peer's)
        raise Refused("; ".join(own), domain=name)
    candidates, refused = [], {}
    for view in (await cluster.hosts())[1:]:  # (the first is this host)
        if not view.reachable or view.info is None:
            refused[view.name] = f"unreachable ({view.error})"
            continue
        if getattr(view.info, "maintenance", False):
            refused[view.name] = "in maintenance mode"
            continue
        blockers, _ = await mig.check(name, req.model_copy(update={"dest": view.name,
                                                                   "auto": False}))
        if blockers:
            refused[view.name] = "; ".join(blockers)
            continue
        candidates.append(Candidate(view.name, view.info.memory_free))
    need = dom.config.memory if dom.proc is not None else 0
    plan = place([Moving(name, need, frozenset(c.name for c in candidates), refused)],
                 candidates)
    if name in plan.stays:
        raise Refused(f"no host can take domain {name}: {plan.stays[name]}", domain=name)
    return plan.moves[name]
