"""The convergence policy: given a live migration's history, what to do next.

A pure function of what the source has seen — every ``query-migrate`` sample,
the time since Perform began, the options, whether the operator asked to
abort, how many heartbeats the destination missed — so it is unit-tested with
recorded histories and the source job only applies what it says. The
mechanism that throttles a guest is QEMU's auto-converge (on for every live
migration from the start: QEMU cannot turn it on mid-stream); the policy notes
when QEMU starts throttling, so the record shows each escalation and its time.

Post-copy joins the escalation ladder with the convergence issue:
pre-copy → throttle → post-copy → the timeout action.
"""
from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from ferry.migration.models import MigrateOptions, Mode, OnTimeout
from ferry.stats import MigrationStats

HEARTBEAT_MISSES = 2  # unanswered heartbeats before the source gives up
PAUSED_GRACE_S = 120.0  # beyond twice the timeout, for the paused guest's last copy


def paused_limit(options: MigrateOptions) -> float:
    """Seconds after which a stream with the guest paused (offline, or after the
    timeout's pause) is given up: every migration ends."""
    return 2 * options.timeout_s + PAUSED_GRACE_S


class Action(enum.StrEnum):
    proceed = "continue"   # keep copying
    pause = "pause"        # stop the guest: the rest goes over as offline
    abort = "abort"        # cancel on purpose (operator, --on-timeout abort)
    fail = "fail"          # cancel: the destination is gone


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""
    # something worth a line in the record (an escalation) even if we go on
    note: str | None = None


CONTINUE = Decision(Action.proceed)


def decide(history: Sequence[MigrationStats], elapsed: float, options: MigrateOptions, *,
           paused: bool = False, abort_requested: str | None = None,
           peer_misses: int = 0) -> Decision:
    """What the source does after the newest sample in ``history``.

    ``elapsed``: seconds since the stream started; ``paused``: the guest is
    already stopped (offline, or paused by an earlier decision)."""
    if abort_requested:
        return Decision(Action.abort, abort_requested)
    if peer_misses >= HEARTBEAT_MISSES:
        return Decision(Action.fail, f"the destination missed {peer_misses} heartbeats")
    if elapsed > options.timeout_s:
        if options.on_timeout == OnTimeout.abort:
            return Decision(Action.abort, f"did not converge within {options.timeout_s:g}s "
                            "(on_timeout=abort)")
        if not paused:
            return Decision(Action.pause, f"did not converge within "
                            f"{options.timeout_s:g}s (on_timeout=pause): the guest is "
                            "paused so the rest goes over as offline")
    limit = paused_limit(options)
    if paused and elapsed > limit:
        # a paused guest's stream only has to send what is left once: if even that
        # does not end, the link or a QEMU is stuck; give up rather than hang
        return Decision(Action.abort, f"the stream did not end within {limit:g}s, even "
                        "with the guest paused")
    note = throttle_note(history) if options.mode == Mode.live else None
    return Decision(Action.proceed, note=note)


def throttle_note(history: Sequence[MigrationStats]) -> str | None:
    """A note when QEMU's auto-converge starts throttling or throttles harder than
    ever before in this migration (it only ever raises the throttle)."""
    if not history:
        return None
    now = history[-1].throttle_pct
    before = max((s.throttle_pct for s in history[:-1]), default=0)
    if now > before:
        latest = history[-1]
        return (f"auto-converge throttles the guest to {100 - now}% of its CPU "
                f"(pass {latest.passes}, dirtying {latest.dirty_rate >> 20} MiB/s)")
    return None
