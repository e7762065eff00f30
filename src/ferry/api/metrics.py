"""``/metrics``: the host in Prometheus' text format (prometheus-client).

What is true now (domains by state, memory and vCPUs allocated against the
host's, running jobs and their progress, console sessions, maintenance) is
read at each scrape; what happened (migrations by mode and result, their time,
pause and bytes) is counted as jobs end, from the event bus. Counters start
at zero when ferryd starts, as Prometheus expects of a restarted process.
docs/metrics.md lists every metric.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ferry.api.consoles import Consoles
from ferry.domains import DomainService
from ferry.migration.models import FINAL_STATES, JobState
from ferry.migration.source import MigrationService
from ferry.models import DomainState, HostInfo

log = logging.getLogger(__name__)

DURATION_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
DOWNTIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BYTES_BUCKETS = tuple(float(1 << n) for n in range(20, 41, 2))   # 1 MiB .. 1 TiB
SEEN_MAX = 10_000   # ended jobs remembered, so that each is counted once


class HostCollector(Collector):
    """The gauges, read from the services at each scrape."""

    def __init__(self, svc: DomainService, mig: MigrationService, consoles: Consoles,
                 hostinfo: Callable[[], HostInfo]) -> None:
        self.svc, self.mig, self.consoles, self.hostinfo = svc, mig, consoles, hostinfo

    def describe(self) -> list[Any]:
        return []   # (collected at scrape time only: no values at registration)

    def collect(self) -> Iterator[Any]:
        info = self.hostinfo()
        by_state = GaugeMetricFamily("ferry_domains", "Domains defined on this host, by state",
                                     labels=["state"])
        counts = {s.value: 0 for s in DomainState}
        for dom in self.svc.domains.values():
            counts[dom.state.value] += 1
        for state, n in counts.items():
            by_state.add_metric([state], n)
        yield by_state
        running = [d for d in self.svc.domains.values() if d.proc is not None]
        yield GaugeMetricFamily("ferry_domain_memory_allocated_bytes",
                                "Memory of the domains that run here",
                                value=sum(d.config.memory for d in running) << 20)
        yield GaugeMetricFamily("ferry_domain_vcpus_allocated",
                                "vCPUs of the domains that run here",
                                value=sum(d.config.vcpus for d in running))
        yield GaugeMetricFamily("ferry_host_memory_total_bytes", "The host's memory",
                                value=info.memory_total << 20)
        yield GaugeMetricFamily("ferry_host_memory_free_bytes",
                                "Memory a new domain may use now (ferry host: memory_free)",
                                value=info.memory_free << 20)
        yield GaugeMetricFamily("ferry_host_memory_reserved_bytes",
                                "Memory kept back: memory_reserve plus what arriving "
                                "migrations were promised", value=info.memory_reserved << 20)
        yield GaugeMetricFamily("ferry_host_cpus", "The host's CPUs",
                                value=os.cpu_count() or 0)
        yield GaugeMetricFamily("ferry_host_maintenance",
                                "1 while the host is in maintenance mode",
                                value=1 if info.maintenance else 0)
        jobs = self.mig.running()
        per_role = GaugeMetricFamily("ferry_migration_jobs_running",
                                     "Migrations that have not ended, by this host's role",
                                     labels=["role"])
        for role in ("source", "destination"):
            per_role.add_metric([role], sum(1 for j in jobs if j.role.value == role))
        yield per_role
        queued = GaugeMetricFamily("ferry_migration_jobs_queued",
                                   "Outgoing migrations waiting for a slot ([limits])",
                                   value=sum(1 for j in jobs if j.queued))
        yield queued
        progress = GaugeMetricFamily("ferry_migration_job_progress_ratio",
                                     "A running job's copy, 0 to 1",
                                     labels=["job", "domain", "role"])
        remaining = GaugeMetricFamily("ferry_migration_job_remaining_bytes",
                                      "A running job's memory still to send in this pass",
                                      labels=["job", "domain", "role"])
        for j in jobs:
            labels = [j.id, j.domain, j.role.value]
            progress.add_metric(labels, (j.stats.progress_pct or 0.0) / 100)
            remaining.add_metric(labels, j.stats.remaining)
        yield progress
        yield remaining
        yield GaugeMetricFamily("ferry_console_sessions",
                                "Console sessions open on this host (local and relayed)",
                                value=self.consoles.sessions())


class Metrics:
    """This ferryd's registry: the gauges, the counters of ended migrations, and
    the process' own metrics."""

    def __init__(self, svc: DomainService, mig: MigrationService, consoles: Consoles,
                 hostinfo: Callable[[], HostInfo]) -> None:
        self.svc, self.mig = svc, mig
        self.registry = CollectorRegistry()
        self.registry.register(HostCollector(svc, mig, consoles, hostinfo))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.migrations = Counter("ferry_migrations", "Migrations that ended, by this "
                                  "host's role, mode and result",
                                  ["role", "mode", "result"], registry=self.registry)
        self.duration = Histogram("ferry_migration_duration_seconds",
                                  "Time of a migration from Begin to its end (as source)",
                                  ["mode"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.downtime = Histogram("ferry_migration_downtime_seconds",
                                  "The guest's pause in a completed migration (as source)",
                                  ["mode"], buckets=DOWNTIME_BUCKETS, registry=self.registry)
        self.sent = Histogram("ferry_migration_transferred_bytes",
                              "Memory bytes a completed migration sent (as source)",
                              ["mode"], buckets=BYTES_BUCKETS, registry=self.registry)
        self.disk_sent = Histogram("ferry_migration_disk_bytes",
                                   "Disk bytes a completed migration copied (as source)",
                                   ["mode"], buckets=BYTES_BUCKETS, registry=self.registry)
        self._task: asyncio.Task[None] | None = None
        self._seen: set[tuple[str, str]] = set()

    def start(self) -> None:
        self._queue = self.svc.events.subscribe()
        self._task = asyncio.create_task(self._follow())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self.svc.events.unsubscribe(self._queue)

    async def _follow(self) -> None:
        while True:
            event = await self._queue.get()
            if event.get("kind") != "migration.state":
                continue
            try:
                self.observe(event)
            except Exception:  # (a metric is never worth stopping for)
                log.exception("metrics: %s", event)

    def observe(self, event: dict[str, Any]) -> None:
        """A job's state changed: count it once it has ended."""
        state = str(event.get("state"))
        key = (str(event.get("job")), str(event.get("role")))
        if state not in {s.value for s in FINAL_STATES} or key in self._seen:
            return
        self._seen.add(key)
        if len(self._seen) > SEEN_MAX:   # (a job ends once: the oldest are not needed)
            self._seen = set(list(self._seen)[-SEEN_MAX // 2:])
        mode = str(event.get("mode") or "unknown")
        self.migrations.labels(key[1], mode, state).inc()
        if key[1] != "source":
            return
        rec = self.mig.get(key[0])
        if rec.ended is not None:
            self.duration.labels(mode).observe(max(0.0, rec.ended - rec.started))
        if rec.state == JobState.completed:
            if rec.stats.downtime_ms is not None:
                self.downtime.labels(mode).observe(rec.stats.downtime_ms / 1000)
            self.sent.labels(mode).observe(rec.stats.transferred)
            if rec.stats.disk_bytes:
                self.disk_sent.labels(mode).observe(rec.stats.disk_bytes)

    content_type = CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        return generate_latest(self.registry)

