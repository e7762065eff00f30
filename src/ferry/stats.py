"""A migration's numbers and QEMU's migration statuses, as one typed vocabulary.

``MigrationStatus`` is QEMU's ``MigrationStatus`` enum (``query-migrate``'s
``status``, the ``MIGRATION`` event's ``status``), spelled once. ``MigrationStats``
is what the job record keeps, the API returns, the CLI's progress display and
the metrics read: QEMU's counters in our names and units. Pure models, no QEMU
here (``ferry.qemu.migrate`` fills them in), so the CLI may import them.
"""
from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, ConfigDict


class MigrationStatus(enum.StrEnum):
    none = "none"
    setup = "setup"
    cancelling = "cancelling"
    cancelled = "cancelled"
    active = "active"
    postcopy_active = "postcopy-active"
    postcopy_paused = "postcopy-paused"
    postcopy_recover_setup = "postcopy-recover-setup"
    postcopy_recover = "postcopy-recover"
    completed = "completed"
    failed = "failed"
    colo = "colo"
    pre_switchover = "pre-switchover"
    device = "device"
    wait_unplug = "wait-unplug"

    @classmethod
    def parse(cls, value: object) -> MigrationStatus:
        """QEMU's string; an unknown one (a newer QEMU) counts as ``active``, so a
        poller keeps watching rather than mistaking it for an end."""
        try:
            return cls(str(value))
        except ValueError:
            return cls.active

    @property
    def in_flight(self) -> bool:
        """The stream runs (or is being set up, or wound down): cancel before undo."""
        return self in IN_FLIGHT

    @property
    def ended(self) -> bool:
        return self in (MigrationStatus.completed, MigrationStatus.failed,
                        MigrationStatus.cancelled)


IN_FLIGHT = frozenset({
    MigrationStatus.setup, MigrationStatus.active, MigrationStatus.pre_switchover,
    MigrationStatus.device, MigrationStatus.wait_unplug, MigrationStatus.cancelling,
    MigrationStatus.postcopy_active, MigrationStatus.postcopy_recover_setup,
    MigrationStatus.postcopy_recover})
# the guest runs at the destination and the source still serves its memory
POSTCOPY = frozenset({
    MigrationStatus.postcopy_active, MigrationStatus.postcopy_paused,
    MigrationStatus.postcopy_recover_setup, MigrationStatus.postcopy_recover})


class MigrationStats(BaseModel):
    """A migration's numbers: the latest ``query-migrate`` plus what Ferry measured.

    Bytes are bytes, rates bytes per second (``mbps`` is QEMU's own megabits per
    second), times milliseconds. The JSON keys are the record's since 0.1."""

    model_config = ConfigDict(extra="allow")  # keys of other versions pass through

    status: MigrationStatus = MigrationStatus.none
    transferred: int = 0          # bytes of RAM sent so far
    remaining: int = 0            # bytes of RAM still to send in this pass
    total: int = 0                # bytes of guest RAM
    mbps: float = 0.0             # throughput QEMU measured (Mbit/s)
    dirty_rate: int = 0           # bytes/s the guest dirties
    passes: int = 0               # dirty-sync count: 1 = the first full pass
    expected_downtime_ms: int | None = None
    throttle_pct: int = 0         # auto-converge's CPU throttle now
    total_time_ms: int | None = None
    downtime_ms: int | None = None
    setup_time_ms: int | None = None
    paused_ms: float | None = None   # source STOP → destination RESUME (QEMUs' events)
    stream_tls: bool = False      # the stream is TLS (always, once it started)
    downtime_limit_ms: int | None = None  # QEMU's downtime-limit, as Ferry steps it
    progress_pct: float | None = None  # of the whole job's copy; never goes back
    eta_s: float | None = None    # until the copy ends at this rate (None: not converging)
    dirty_rate_sampled: bool = False  # dirty_rate from QEMU's page sampling (first pass)
    channels: int = 0             # multifd channels (0: the single classic stream)
    compression: str = "none"     # of the multifd channels
    forced_pause: bool = False    # --on-timeout pause or `ferry job complete` stopped it
    max_throttle_pct: int = 0     # the highest throttle seen
    qemu_error: str | None = None  # QEMU's error-desc when the stream failed
    postcopy: bool = False        # switched to post-copy (the guest ran on at the
                                  # destination while the rest followed)
    postcopy_bytes: int = 0       # sent in post-copy (QEMU's ram.postcopy-bytes)
    postcopy_requests: int = 0    # pages the destination asked for (page faults)
    recoveries: int = 0           # post-copy recoveries after a broken link
    disk_bytes: int = 0           # disk bytes the mirrors copied (they grow as the
    disk_total: int = 0           # guest writes) of disk_total

    def updated(self, info: dict[str, Any]) -> MigrationStats:
        """These stats with one ``query-migrate`` answer applied: counters QEMU
        leaves out (it omits ``ram`` in ``setup``) keep their last value."""
        ram = info.get("ram") or {}
        page = int(ram.get("page-size", 4096))
        throttle = int(info.get("cpu-throttle-percentage", 0))
        update: dict[str, Any] = {
            "status": MigrationStatus.parse(info.get("status", "none")),
            "dirty_rate": int(ram.get("dirty-pages-rate", 0)) * page,
            "throttle_pct": throttle,
            "max_throttle_pct": max(self.max_throttle_pct, throttle),
        }
        if "error-desc" in info:
            update["qemu_error"] = str(info["error-desc"])
        for key, ours in (("transferred", "transferred"), ("total", "total"),
                          ("remaining", "remaining"), ("mbps", "mbps"),
                          ("dirty-sync-count", "passes"),
                          ("postcopy-bytes", "postcopy_bytes"),
                          ("postcopy-requests", "postcopy_requests")):
            if key in ram:
                update[ours] = ram[key]
        for key, ours in (("expected-downtime", "expected_downtime_ms"),
                          ("total-time", "total_time_ms"), ("downtime", "downtime_ms"),
                          ("setup-time", "setup_time_ms")):
            if key in info:
                update[ours] = int(info[key])
        return self.model_copy(update=update)
