"""What the two daemons and the CLI exchange about a migration, and the job record.

The relocation protocol (source ferryd → destination ferryd) is versioned:
every request carries ``protocol`` and every answer the destination's, and a
mismatch is a refusal that names both (``check_protocol``).
"""
from __future__ import annotations

import enum
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ferry.errors import Refused
from ferry.models import (
    MAX_CHANNELS,
    Compression,
    DiskFormat,
    DomainConfig,
    MigrationSettings,
    OnTimeout,
    Postcopy,
)
from ferry.stats import MigrationStats, MigrationStatus

__all__ = ["Compression", "MigrationStats", "MigrationStatus", "OnTimeout", "Postcopy"]

# 1: Ferry 0.1 before versioning (requests without the field); 2: typed answers,
# agreed outcomes, name reservation on the destination; 3: the stream's shape
# (multifd channels, compression) in Prepare; 4: post-copy (Prepare's
# ``postcopy``, Finish in post-copy, recover); 5: disks copied with the domain
# (``copies``, the NBD answer, top-only layers) and disk cache modes
PROTOCOL_VERSION = 5
JOB_ID = r"^[0-9a-f]{12}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CopyStorage(enum.StrEnum):
    """Which disks a migration copies to the destination."""

    auto = "auto"   # those in pools that are not shared
    all = "all"     # every disk (also those in shared pools)
    none = "none"   # none: the destination has them already


class Mode(enum.StrEnum):
    live = "live"
    offline = "offline"


class Phase(enum.StrEnum):
    begin = "begin"
    prepare = "prepare"
    perform = "perform"
    finish = "finish"
    confirm = "confirm"


class Role(enum.StrEnum):
    source = "source"
    destination = "destination"


class JobState(enum.StrEnum):
    running = "running"
    completed = "completed"    # the destination runs the guest (cleanup_error: a
                               # leftover on the source, not a failed migration)
    failed = "failed"          # undone: the guest is where it was
    aborted = "aborted"        # stopped on purpose and undone
    in_doubt = "in_doubt"      # the source cannot tell whether the destination runs
                               # the guest: its copy stays paused until it can
    lost = "lost"              # post-copy had begun and a QEMU holding part of the
                               # guest died: no whole copy is left anywhere


# the only ways a job's state may change (JobRecords.set_state checks them)
JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.running: frozenset({JobState.completed, JobState.failed, JobState.aborted,
                                 JobState.in_doubt, JobState.lost}),
    JobState.in_doubt: frozenset({JobState.completed, JobState.failed, JobState.lost}),
    # the side that decided tells the other, whose record then takes that outcome
    JobState.failed: frozenset({JobState.aborted, JobState.lost}),
    JobState.aborted: frozenset({JobState.failed, JobState.lost}),
    # the destination runs the guest, but in post-copy part of its memory was still
    # on the source when a QEMU died
    JobState.completed: frozenset({JobState.lost}),
    JobState.lost: frozenset(),
}
FINAL_STATES = frozenset({JobState.completed, JobState.failed, JobState.aborted,
                          JobState.lost})


MAX_DEFAULT_CHANNELS = 4


def default_channels() -> int:
    """Encrypted channels when nobody says: one per core, at most
    MAX_DEFAULT_CHANNELS. On a 2-core host 2 channels moved a paused guest's
    memory over TLS 1.8x as fast as one stream; 4 measured slower than 2 in one
    run and faster in another, within that machine's noise, so channels follow
    the cores that encrypt them (docs/performance.md)."""
    return max(1, min(MAX_DEFAULT_CHANNELS, os.cpu_count() or 1))


class MigrateOptions(Strict):
    """A migration's options as the job runs with them: every tunable decided."""

    mode: Mode = Mode.offline
    max_downtime_ms: int = Field(default=300, ge=1, le=600_000)
    bandwidth_mibps: int = Field(default=0, ge=0, le=1_000_000,
                                 description="0: unlimited")
    timeout_s: float = Field(default=600.0, gt=0, le=86_400)
    on_timeout: OnTimeout = OnTimeout.pause
    parallel: int = Field(default_factory=default_channels, ge=1, le=MAX_CHANNELS)
    compress: Compression = Compression.none   # (with parallel 1: one compressed channel)
    # pre-copy only by default: in post-copy the guest's memory is split across two
    # hosts until the copy ends, so a broken link stops the guest until it is
    # recovered, and a QEMU that dies loses it; pre-copy with the stepped pause
    # already ends within the bounds (docs/migration.md)
    postcopy: Postcopy = Postcopy.never
    copy_storage: CopyStorage = CopyStorage.auto
    keep_source_disks: bool = False   # the copied disks stay on the source after Confirm

    @classmethod
    def resolve(cls, mode: Mode, *layers: MigrationSettings | None) -> MigrateOptions:
        """The options from ``layers``, first one first (request, domain, host):
        each tunable from the first layer that sets it, else Ferry's default."""
        values: dict[str, Any] = {"mode": mode}
        for name in MigrationSettings.model_fields:
            for layer in layers:
                if layer is not None and getattr(layer, name) is not None:
                    values[name] = getattr(layer, name)
                    break
        return cls.model_validate(values)

    @property
    def postcopy_allowed(self) -> bool:
        """May this job switch to post-copy (by the policy, the timeout, or
        ``ferry job complete``)?"""
        return self.mode == Mode.live and (self.postcopy != Postcopy.never
                                           or self.on_timeout == OnTimeout.postcopy)

    @property
    def multifd(self) -> bool:
        """Does the stream use QEMU's multifd channels (parallel or compressed)?"""
        return self.parallel > 1 or self.compress != Compression.none


class MigrateRequest(MigrationSettings):
    """``POST /v1/domains/NAME/migrate``: what is left out comes from the domain's
    and the host's ``[migration]`` defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Mode = Mode.offline
    dest: str = Field(default="", max_length=255)
    # pick the destination: the peer that passes the pre-flight check and has the
    # most memory free (ferry.fleet.placement)
    auto: bool = False
    check: bool = False
    copy_storage: CopyStorage = CopyStorage.auto
    keep_source_disks: bool = False
    # migrate a running guest whose disk on a shared pool is cached by the host
    # (cache writeback, writethrough or unsafe): the destination may read stale data
    unsafe: bool = False

    @model_validator(mode="after")
    def _where(self) -> MigrateRequest:
        if not self.auto and not self.dest:
            raise ValueError("dest: say where to (a peer's name or ADDRESS[:PORT]), or "
                             "auto: true")
        if self.auto and self.dest:
            raise ValueError("dest: leave it out with auto: true (Ferry picks it)")
        return self


class MigrationCheck(BaseModel):
    """``ferry migrate --check``: every blocker on both hosts (none: it may go)."""

    domain: str
    dest: str
    blockers: list[str]
    notes: list[str] = Field(default_factory=list)


class SteerRequest(Strict):
    """``ferry job set``: new limits for a running job (what is left out stays)."""

    bandwidth_mibps: int | None = Field(default=None, ge=0, le=1_000_000,
                                        description="0: unlimited")
    max_downtime_ms: int | None = Field(default=None, ge=1, le=600_000)


class ResolveRequest(Strict):
    """The operator's verdict on a job in doubt: where the guest is to run."""

    runs_on: Role


class StreamCreds(Strict):
    """One QEMU's half of a migration's TLS credentials (PEM); see streamtls."""

    ca: str = Field(max_length=16384)
    cert: str = Field(max_length=16384)
    key: str = Field(max_length=16384, repr=False)


class Blocker(Strict):
    """One reason a host can't take a domain: ``code`` for programs (memory,
    name, uuid, arriving, machine, cpu, arch, accel, kernel, initrd, disk,
    bridge, protocol, maintenance), ``message`` for people."""

    code: str = Field(max_length=32)
    message: str = Field(max_length=2000)


# -- the relocation protocol -------------------------------------------------------
class DiskCopy(Strict):
    """One disk a migration copies: the destination makes an empty image like it."""

    index: int = Field(ge=0, le=63)          # in the domain's disks
    format: DiskFormat
    virtual_size: int = Field(gt=0, le=64 << 40)
    allocated: int = Field(ge=0, le=64 << 40)  # bytes it takes on the source
    # a qcow2 overlay of a base image in the same pool: that base's name and
    # identity; a destination with the same base gets only the top layer
    base: str | None = Field(default=None, max_length=255)
    base_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    base_format: DiskFormat | None = None
    # bytes the images below it take on the source (a full copy flattens them in)
    base_allocated: int = Field(default=0, ge=0, le=64 << 40)


class RelocationRequest(Strict):
    """Source → destination (check, Prepare): the domain and what it needs there."""

    protocol: int = 1
    job_id: str = Field(pattern=JOB_ID)
    source: str
    config: DomainConfig
    mode: Mode
    running: bool        # False: a shut-off domain, move the definition only
    accel: str | None
    arch: str
    # the destination QEMU's TLS credentials for this job's stream (Prepare only;
    # never stored): without them a running domain is refused
    stream: StreamCreds | None = Field(default=None, repr=False)
    # the stream's shape, which both QEMUs must share: multifd channels (0: the
    # single classic stream) and their compression
    channels: int = Field(default=0, ge=0, le=MAX_CHANNELS)
    compress: Compression = Compression.none
    postcopy: bool = False   # the stream may switch to post-copy (both need postcopy-ram)
    # the disks to copy: the destination creates each in its pool of the same name
    # and exports it over NBD (TLS, the job's credentials) for the source's mirror
    copies: list[DiskCopy] = Field(default_factory=list, max_length=64)

    @model_validator(mode="after")
    def _compressed_channels(self) -> RelocationRequest:
        if self.compress != Compression.none and not self.channels:
            raise ValueError(f"compress {self.compress.value} needs multifd channels "
                             "(channels >= 1)")
        return self


class CheckAnswer(Strict):
    protocol: int = 1
    blockers: list[Blocker] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)   # e.g. how each disk is copied


class PrepareAnswer(Strict):
    protocol: int = 1
    uri: str | None      # where the stream goes (None: a shut-off domain)
    # the NBD server (TLS) exporting each copied disk as "disk<index>"
    nbd_port: int | None = Field(default=None, ge=1, le=65535)
    nbd_address: str | None = Field(default=None, max_length=15)
    # copied disks whose base image is here already: only their top layer goes
    top_only: list[int] = Field(default_factory=list)


class FinishRequest(Strict):
    job_id: str = Field(pattern=JOB_ID)
    resume: bool
    # the stream is in post-copy: run the guest once its devices are loaded, while
    # the rest of its memory follows (the source serves it until the stream ends)
    postcopy: bool = False
    stats: MigrationStats = Field(default_factory=MigrationStats)
    # the console log so far (base64) and the offset of its first byte, so the
    # console's output continues on the destination with the same offsets
    console_base: int = Field(default=0, ge=0)
    console_b64: str = Field(default="", max_length=8 << 20)


class FinishAnswer(Strict):
    finish_s: float
    resumed: bool
    # when the guest's CPU started again here (QEMU's RESUME event, wall clock)
    resumed_at: float | None = None


class AbortRequest(Strict):
    """Source → destination: drop your side; the job ended with ``outcome``,
    decided by the source in ``phase`` for ``reason``."""

    job_id: str = Field(pattern=JOB_ID)
    reason: str = Field(default="", max_length=4000)
    outcome: Literal[JobState.failed, JobState.aborted, JobState.lost] = JobState.failed
    phase: Phase | None = None
    host: str | None = Field(default=None, max_length=255)  # where it went wrong


class AbortAnswer(Strict):
    aborted: bool        # True: this call undid the destination's side
    state: JobState | None = None   # the destination's record of the job now


class JobStatus(Strict):
    """The destination's view of a job (the source's heartbeat and verdicts)."""

    job_id: str
    state: JobState
    phase: Phase
    qemu_alive: bool | None = None
    error: dict[str, Any] | None = None
    # in post-copy, after Finish: the incoming stream's status (None: not in post-copy)
    stream: MigrationStatus | None = None


class RecoverRequest(Strict):
    """Source → destination: the post-copy stream broke; listen again for it, with
    fresh TLS credentials (``generation`` counts the recoveries)."""

    job_id: str = Field(pattern=JOB_ID)
    generation: int = Field(ge=1, le=1000)
    stream: StreamCreds = Field(repr=False)


class RecoverAnswer(Strict):
    uri: str


def check_protocol(theirs: int, who: str, us: str) -> None:
    """Refuse to talk to a ferryd whose relocation protocol differs."""
    if theirs != PROTOCOL_VERSION:
        raise Refused(f"host {who} speaks relocation protocol {theirs}, host {us} "
                      f"speaks {PROTOCOL_VERSION}: upgrade both to the same Ferry",
                      host=us, blocker="protocol")


# -- the job record ----------------------------------------------------------------
class SourceFacts(BaseModel):
    """What the source's undos read: each is saved in the record *before* the step
    that makes it true, so a restarted ferryd runs the same undos from the store."""

    dest_contacted: bool = False   # Prepare was sent: the destination may hold a side
    was_running: bool | None = None  # the guest ran when Perform began
    tls_installed: bool = False    # our QEMU may hold the job's tls-creds object
    stream_started: bool = False   # `migrate` was sent: the stream may complete alone
    finish_sent: bool = False      # Finish was sent: the destination may run the guest
    dest_gone: bool = False        # the destination said its copy is gone
    copied_paths: list[str] = Field(default_factory=list)  # source images being copied
    mirrors: list[int] = Field(default_factory=list)  # disks whose mirror may run
    disk_server: bool = False      # a shut-off domain's disk server QEMU may run
    disks_copied: bool = False     # every mirror ended in sync before Finish
    postcopy_started: bool = False  # migrate-start-postcopy was sent: the destination
                                   # may hold the newest state, so ours never resumes
    dest_resumed: bool = False     # Finish answered: the destination runs the guest
                                   # (and keeps its definition, whatever follows)
    stale_copy: bool = False       # Confirm failed: a fenced copy is left here, which
                                   # a restarted ferryd removes (then this is cleared)
    registry_committed: bool = False  # the registry may name the destination the owner
                                   # (committed before a switch to post-copy)


class DestinationFacts(BaseModel):
    """What the destination's undo reads (saved before each step)."""

    config: DomainConfig | None = None   # the arriving domain (its name is reserved)
    reserved_mib: int = 0          # memory reserved for it
    qemu_started: bool = False     # an incoming QEMU may run in its directory
    copies: list[DiskCopy] = Field(default_factory=list)  # the disks copied here
    top_only: list[int] = Field(default_factory=list)   # of them, only their top layer
    images_created: list[str] = Field(default_factory=list)  # paths made for copies
    nbd_started: bool = False      # its NBD server may export the copies
    disk_server: bool = False      # a disk server QEMU (shut-off domain) may run
    resumed: bool = False          # `cont` was sent: the guest may have run here, so
                                   # this side is never undone again
    registry_committed: bool = False  # the cluster registry may name this host owner


class StoredOptions(MigrateOptions):
    """The options as a record keeps them (tolerant of options a newer Ferry adds;
    a record from before the channels ran one stream)."""

    model_config = ConfigDict(extra="ignore")

    parallel: int = Field(default=1, ge=1, le=MAX_CHANNELS)


class JobRecord(BaseModel):
    """A migration as either host keeps it (``ferry jobs``, ``ferry migrations``)."""

    model_config = ConfigDict(extra="allow")  # what a newer Ferry adds is kept

    id: str
    domain: str
    mode: Mode
    role: Role
    source: str
    dest: str
    state: JobState = JobState.running
    phase: Phase = Phase.begin
    error: dict[str, Any] | None = None   # phase, host, message, kind, undo_errors
    decided_by: str | None = None         # the host that decided the outcome
    cleanup_error: str | None = None      # completed, but something was left behind
    started: float
    ended: float | None = None
    stats: MigrationStats = Field(default_factory=MigrationStats)
    phase_times: dict[str, float] = Field(default_factory=dict)
    options: StoredOptions | None = None
    source_facts: SourceFacts = Field(default_factory=SourceFacts)
    dest_facts: DestinationFacts = Field(default_factory=DestinationFacts)
    escalations: list[dict[str, Any]] = Field(default_factory=list)  # time, action, why
    # each copied disk: index, disk, mode (full | top), bytes, first_pass_s, saved_bytes
    disks: list[dict[str, Any]] = Field(default_factory=list)
    # why the job waits before it goes on (a host's [limits]); None: it is not queued
    queued: str | None = None
    # what happened when, on this host: {time, what (phase | state), detail}
    # (escalations have their own list, with their times); `ferry job log`
    timeline: list[dict[str, Any]] = Field(default_factory=list)

    @classmethod
    def from_stored(cls, raw: dict[str, Any]) -> JobRecord:
        """A record as the store has it, also one written by Ferry 0.1 (no facts:
        they are derived from the phase it reached, erring on the side of "it may
        have happened", so an undo does too much rather than too little)."""
        if raw.get("role") == Role.source.value and "source_facts" not in raw:
            at = list(Phase).index(Phase(raw.get("phase", "begin")))
            stats = raw.get("stats") or {}
            raw = {**raw, "source_facts": {
                "dest_contacted": at >= 1, "tls_installed": at >= 2,
                "stream_started": at >= 2, "finish_sent": at >= 3,
                "was_running": stats.get("was_running")}}
        return cls.model_validate(raw)
