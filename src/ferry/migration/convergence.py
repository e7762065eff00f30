"""The convergence policy: given a live migration's history, what to do next.

A pure function of what the source has seen — every ``query-migrate`` sample,
the time since Perform began, the options, whether the operator asked to
abort, how many heartbeats the destination missed — so it is unit-tested with
recorded histories and the source job only applies what it says. The
mechanism that throttles a guest is QEMU's auto-converge (on for every live
migration from the start: QEMU cannot turn it on mid-stream); the policy notes
when QEMU starts throttling, so the record shows each escalation and its time.

The allowed pause is stepped up too: QEMU switches over once it expects to
send the rest within its ``downtime-limit``. Ferry starts that limit low
(DOWNTIME_START_MS), so a guest that converges anyway pauses briefly, and
doubles it once per pass from the third pass on while QEMU expects a longer
pause, up to the operator's ``--max-downtime``: a busy guest then converges
with a pause within its bound instead of a throttle. (Measured: QEMU's own
estimate of the bandwidth makes it switch over with more left than a multifd
stream sends in the time it expects; a low limit takes ~2/3 off an idle
guest's downtime — docs/performance.md.)

The ladder, each rung only as far as needed: pre-copy → downtime steps and
auto-converge's throttle → post-copy (``--postcopy auto``: once the allowed
pause is at its bound, from pass POSTCOPY_AFTER_PASSES on, and QEMU still
expects a longer one) → the timeout action (``--on-timeout``). ``--postcopy
now`` switches as soon as the stream is under way; ``ferry job complete``
switches to post-copy where it is allowed, else pauses.
"""
from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from ferry.migration.models import MigrateOptions, Mode, OnTimeout, Postcopy
from ferry.stats import MigrationStats, MigrationStatus

HEARTBEAT_MISSES = 2  # unanswered heartbeats before the source gives up
DOWNTIME_START_MS = 50  # QEMU's downtime-limit at the start of a live migration
STEP_AFTER_PASSES = 2   # passes at the start limit before it is stepped up
PAUSED_GRACE_S = 120.0  # beyond twice the timeout, for the paused guest's last copy
POSTCOPY_AFTER_PASSES = 6  # --postcopy auto: not before this pass (the pause steps first)


def paused_limit(options: MigrateOptions) -> float:
    """Seconds after which a stream with the guest paused (offline, or after the
    timeout's pause) is given up: every migration ends."""
    return 2 * options.timeout_s + PAUSED_GRACE_S


class Action(enum.StrEnum):
    proceed = "continue"   # keep copying
    pause = "pause"        # stop the guest: the rest goes over as offline
    abort = "abort"        # cancel on purpose (operator, --on-timeout abort)
    fail = "fail"          # cancel: the destination is gone
    postcopy = "postcopy"  # switch to post-copy: the guest runs on at the destination


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""
    # something worth a line in the record (an escalation) even if we go on
    note: str | None = None
    # a higher downtime-limit for QEMU (ms), with why
    downtime_ms: int | None = None
    downtime_note: str | None = None


CONTINUE = Decision(Action.proceed)


def initial_downtime(options: MigrateOptions) -> int:
    """QEMU's downtime-limit when the stream starts (ms)."""
    if options.mode != Mode.live:
        return options.max_downtime_ms  # paused: nothing to shorten
    return min(DOWNTIME_START_MS, options.max_downtime_ms)


def downtime_step(history: Sequence[MigrationStats], current_ms: int,
                  options: MigrateOptions) -> int | None:
    """A higher downtime-limit after the newest sample, or None to keep
    ``current_ms``: from pass STEP_AFTER_PASSES + 1 on, while QEMU expects a
    longer pause than the limit, the limit is DOWNTIME_START_MS doubled once per
    pass since, at most the operator's ``max_downtime_ms``."""
    if not history or options.mode != Mode.live or current_ms >= options.max_downtime_ms:
        return None
    latest = history[-1]
    if latest.passes <= STEP_AFTER_PASSES:
        return None
    expected = latest.expected_downtime_ms
    if expected is not None and expected <= current_ms:
        return None  # QEMU will switch over with the limit it has
    steps = min(latest.passes - STEP_AFTER_PASSES, 16)
    target = min(options.max_downtime_ms, initial_downtime(options) << steps)
    return target if target > current_ms else None


def decide(history: Sequence[MigrationStats], elapsed: float, options: MigrateOptions, *,
           paused: bool = False, abort_requested: str | None = None,
           peer_misses: int = 0, downtime_ms: int | None = None,
           complete_requested: str | None = None, postcopy_possible: bool = True
           ) -> Decision:
    """What the source does after the newest sample in ``history``.

    ``elapsed``: seconds since the stream started; ``paused``: the guest is
    already stopped (offline, or paused by an earlier decision); ``downtime_ms``:
    QEMU's downtime-limit now (None: the one it started with);
    ``complete_requested``: the operator asked to finish now (why);
    ``postcopy_possible``: False once QEMU refused to switch to post-copy (then
    what would have been post-copy is a pause)."""
    if abort_requested:
        return Decision(Action.abort, abort_requested)
    if peer_misses >= HEARTBEAT_MISSES:
        return Decision(Action.fail, f"the destination missed {peer_misses} heartbeats")
    postcopy = options.postcopy_allowed and postcopy_possible and not paused
    if complete_requested and not paused:
        if postcopy:
            return Decision(Action.postcopy, f"{complete_requested}: post-copy (the "
                            "guest runs on at the destination)")
        return Decision(Action.pause, f"{complete_requested}: the guest is paused so "
                        "the rest goes over as offline")
    under_way = bool(history) and history[-1].status == MigrationStatus.active
    if postcopy and options.postcopy == Postcopy.now and under_way:
        return Decision(Action.postcopy, "--postcopy now")
    if elapsed > options.timeout_s:
        # (once the operator asked to complete, the job finishes: no abort)
        if options.on_timeout == OnTimeout.abort and not complete_requested:
            return Decision(Action.abort, f"did not converge within {options.timeout_s:g}s "
                            "(on_timeout=abort)")
        if not paused and options.on_timeout == OnTimeout.postcopy and postcopy:
            if under_way:
                return Decision(Action.postcopy, f"did not converge within "
                                f"{options.timeout_s:g}s (on_timeout=postcopy)")
        elif not paused:
            return Decision(Action.pause, f"did not converge within "
                            f"{options.timeout_s:g}s (on_timeout="
                            f"{options.on_timeout.value}): the guest is paused so the "
                            "rest goes over as offline")
    limit = paused_limit(options)
    if paused and elapsed > limit:
        # a paused guest's stream only has to send what is left once: if even that
        # does not end, the link or a QEMU is stuck; give up rather than hang
        return Decision(Action.abort, f"the stream did not end within {limit:g}s, even "
                        "with the guest paused")
    current = initial_downtime(options) if downtime_ms is None else downtime_ms
    if postcopy and options.postcopy == Postcopy.auto and under_way:
        why = not_converging(history, current, options)
        if why is not None:
            return Decision(Action.postcopy, why)
    note = throttle_note(history) if options.mode == Mode.live and not paused else None
    step = None if paused else downtime_step(history, current, options)
    if step is None:
        return Decision(Action.proceed, note=note)
    latest = history[-1]
    why = (f"allowed pause {current} → {step} ms (pass {latest.passes}: QEMU expects "
           f"{latest.expected_downtime_ms} ms to send the rest, dirtying "
           f"{latest.dirty_rate >> 20} MiB/s; --max-downtime {options.max_downtime_ms})")
    return Decision(Action.proceed, note=note, downtime_ms=step, downtime_note=why)


def not_converging(history: Sequence[MigrationStats], current_ms: int,
                   options: MigrateOptions) -> str | None:
    """Why pre-copy is judged not to converge (the reason for post-copy), or None:
    the allowed pause is at its bound, the stream is at pass
    POSTCOPY_AFTER_PASSES or later, and QEMU still expects a longer pause."""
    if not history:
        return None
    latest = history[-1]
    expected = latest.expected_downtime_ms
    if latest.passes < POSTCOPY_AFTER_PASSES or current_ms < options.max_downtime_ms \
            or expected is None or expected <= current_ms:
        return None
    return (f"pre-copy is not converging: pass {latest.passes}, QEMU expects "
            f"{expected} ms to send the rest (allowed {current_ms} ms), dirtying "
            f"{latest.dirty_rate >> 20} MiB/s (--postcopy auto)")


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


def progress(latest: MigrationStats, shown_pct: float | None
             ) -> tuple[float | None, float | None]:
    """(percent of the whole job's copy, seconds left) after the newest sample.

    Each pass sends what the guest dirtied during the one before, so with the
    guest dirtying at d bytes/s and the stream sending b, what is still to send
    overall is about ``remaining / (1 - d/b)``; the percent is what was sent of
    what will have been sent. It never goes back (``shown_pct``: what was shown
    before), and the ETA is None while the guest dirties as fast as the stream
    sends. (In the first pass, before QEMU has counted dirty pages, the source
    puts QEMU's page-sampling estimate in ``dirty_rate``.)"""
    if not latest.total:
        return shown_pct, None
    rate = latest.mbps * 1e6 / 8
    ratio = latest.dirty_rate / rate if rate > 0 else 0.0
    left = latest.remaining / (1 - ratio) if ratio < 1 else None
    if left is None:
        return shown_pct, None
    done = latest.transferred / (latest.transferred + left) * 100 if latest.transferred \
        else 0.0
    pct = round(max(done, shown_pct or 0.0), 1)
    return pct, (round(left / rate, 1) if rate > 0 else None)
