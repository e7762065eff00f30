"""The migration job as data: a table of phases, each with its run and its undo,
and the one place a job record's state changes.

A phase's ``run`` saves in the record's facts (``SourceFacts`` on the source)
what it is about to do *before* it does it; its ``undo`` reads only those facts
and is safe to run whatever part of the run happened (every undo is
idempotent). So the runner's failure path and a restarted ferryd's recovery are
the same code: undo every phase that was entered, newest first, from the record.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from ferry.errors import Conflict
from ferry.events import EventBus
from ferry.migration.models import FINAL_STATES, JOB_TRANSITIONS, JobRecord, JobState, Phase
from ferry.store import Store

log = logging.getLogger(__name__)


class HasRecord(Protocol):
    @property
    def record(self) -> JobRecord: ...


J = TypeVar("J", bound=HasRecord)


@dataclass(frozen=True)
class PhaseStep(Generic[J]):
    """One row of a job's table: ``run`` does the phase, ``undo`` (if any) takes
    back whatever of it happened, reading only the record's facts."""

    phase: Phase
    run: Callable[[J], Awaitable[None]]
    undo: Callable[[J], Awaitable[None]] | None = None


PHASE_ORDER = list(Phase)


class JobRecords:
    """The only writer of migration records: persists them and changes their state
    (checked against ``JOB_TRANSITIONS``, logged, published as an event)."""

    def __init__(self, store: Store, events: EventBus, host: str) -> None:
        self.store = store
        self.events = events
        self.host = host

    def save(self, record: JobRecord) -> None:
        self.store.save_migration(record.model_dump(mode="json"))

    def enter(self, record: JobRecord, phase: Phase) -> None:
        """The job enters ``phase``: persisted before the phase runs."""
        record.phase = phase
        record.timeline.append({"time": time.time(), "what": "phase", "detail": phase.value})
        self.save(record)
        self.events.publish("migration.phase", job=record.id, domain=record.domain,
                            role=record.role.value, phase=phase.value)

    def set_state(self, record: JobRecord, new: JobState, *,
                  error: dict[str, object] | None = None, decided_by: str | None = None,
                  cleanup_error: str | None = None) -> None:
        """The one place a job's state changes: check, persist, log, publish."""
        old = record.state
        if new != old and new not in JOB_TRANSITIONS[old]:
            raise Conflict(f"job {record.id} cannot go from {old.value} to {new.value}")
        record.state = new
        if error is not None:
            record.error = dict(error)
        if decided_by is not None:
            record.decided_by = decided_by
        if cleanup_error is not None:
            record.cleanup_error = cleanup_error
        if new in FINAL_STATES or new == JobState.in_doubt:
            record.ended = record.ended or time.time()
        why = (record.error or {}).get("message", "") if new != JobState.completed else ""
        if new != old or error is not None:
            record.timeline.append({"time": time.time(), "what": "state", "detail":
                                    f"{old.value} -> {new.value}" + (f": {why}" if why else "")})
        self.save(record)
        log.info("job %s (%s of %s): %s -> %s%s", record.id, record.role.value,
                 record.domain, old.value, new.value, f" ({why})" if why else "")
        self.events.publish("migration.state", job=record.id, domain=record.domain,
                            role=record.role.value, mode=record.mode.value, state=new.value,
                            phase=record.phase.value, error=record.error)

    def running(self, role: str) -> list[JobRecord]:
        """Records of ``role`` an earlier ferryd left unsettled (running, in doubt)."""
        out = []
        for raw in self.store.migrations():
            if raw.get("role") == role and raw.get("state") in (
                    JobState.running.value, JobState.in_doubt.value):
                out.append(JobRecord.from_stored(raw))
        return out


def timeline_entries(record: JobRecord, host: str) -> list[dict[str, Any]]:
    """One host's part of a job's log (``ferry job log``): its phases and state
    changes, its escalations, and its error, each with its time."""
    where = {"host": host, "role": record.role.value}
    out: list[dict[str, Any]] = [{**where, "time": record.started, "what": "begin",
            "detail": f"{record.mode.value} migration of {record.domain} from "
                      f"{record.source} to {record.dest}"}]
    out += [{**where, **e} for e in record.timeline]
    out += [{**where, "time": e.get("time", record.started), "what": "escalation",
             "detail": f"{e.get('action')}: {e.get('reason')}"} for e in record.escalations]
    if record.error:
        err = record.error
        out.append({**where, "time": record.ended or record.started, "what": "error",
                    "detail": f"{err.get('phase')}@{err.get('host')}: {err.get('message')}"
                    + (f" (undo: {'; '.join(err['undo_errors'])})"
                       if err.get("undo_errors") else "")})
    if record.cleanup_error:
        out.append({**where, "time": record.ended or record.started, "what": "cleanup",
                    "detail": record.cleanup_error})
    out.sort(key=lambda e: float(e.get("time") or 0))
    return out


def entered(steps: Sequence[PhaseStep[J]], phase: Phase) -> list[PhaseStep[J]]:
    """The steps a job in ``phase`` has entered (its own included), in order."""
    at = PHASE_ORDER.index(phase)
    return [s for s in steps if PHASE_ORDER.index(s.phase) <= at]


async def run_steps(job: J, steps: Sequence[PhaseStep[J]], records: JobRecords) -> None:
    """Run the table: each phase persisted before it runs, its time recorded.
    Raises what the failing phase raised; the caller then calls ``undo_steps``."""
    for step in steps:
        records.enter(job.record, step.phase)
        t0 = time.monotonic()
        await step.run(job)
        job.record.phase_times[step.phase.value] = time.monotonic() - t0
        records.save(job.record)


async def undo_steps(job: J, steps: Sequence[PhaseStep[J]]) -> list[str]:
    """Undo every step the job entered, newest first; an undo that fails does not
    stop the others. Returns what failed, as ``phase: error``."""
    errors = []
    for step in reversed(entered(steps, job.record.phase)):
        if step.undo is None:
            continue
        try:
            await step.undo(job)
        except Exception as exc:  # keep undoing the rest; say what was left
            log.exception("job %s: undo of %s failed", job.record.id, step.phase.value)
            errors.append(f"{step.phase.value}: {exc}")
    return errors
