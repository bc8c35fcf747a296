"""An agent's Prometheus metrics (`GET /metrics`), with the official prometheus-client.

Modelled on KubeVirt's migration metrics (kubevirt_vmi_migration_succeeded / _failed,
kubevirt_vmi_migrations_in_running_phase, kubevirt_vmi_migration_data_processed_bytes, its
phase-time histograms). Counters and histograms count the migrations this agent ran as
the source, from their finished reports (`observe_migration`); the gauges are read from
the agent when scraped.

| metric | type | labels |
|---|---|---|
| `godwit_migrations_total` | counter | result (ok, failed, in-doubt), strategy |
| `godwit_migration_downtime_seconds` | histogram | strategy |
| `godwit_migration_duration_seconds` | histogram | strategy |
| `godwit_migration_data_processed_bytes_total` | counter | kind (image, rootfs, wire) |
| `godwit_migration_preflight_refusals_total` | counter | check |
| `godwit_migrations_running` | gauge | |
| `godwit_qos_class_sent_bytes_total` | counter | class (link, migration, default) |
| `godwit_etcd_requests_total` | counter | (cluster mode) |
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from godwit.qos import describe_policy

DOWNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
DATA_KINDS = ("image", "rootfs", "wire")

REGISTRY = CollectorRegistry()
MIGRATIONS = Counter("godwit_migrations", "Finished migrations run as the source",
                     ["result", "strategy"], registry=REGISTRY)
DOWNTIME = Histogram("godwit_migration_downtime_seconds",
                     "Time the container was frozen (freeze to resume)", ["strategy"],
                     buckets=DOWNTIME_BUCKETS, registry=REGISTRY)
DURATION = Histogram("godwit_migration_duration_seconds", "Total time of a migration",
                     ["strategy"], buckets=DURATION_BUCKETS, registry=REGISTRY)
DATA = Counter("godwit_migration_data_processed_bytes",
               "Bytes of CRIU images and rootfs moved, and bytes sent on the wire",
               ["kind"], registry=REGISTRY)
PREFLIGHT_REFUSALS = Counter("godwit_migration_preflight_refusals",
                             "Migrations refused by a pre-flight check before any freeze",
                             ["check"], registry=REGISTRY)


def observe_migration(report: dict[str, Any]) -> None:
    """Count a finished migration (a MigrationReport.to_json())."""
    strategy = report.get("strategy") or "unknown"
    MIGRATIONS.labels(report.get("result") or "unknown", strategy).inc()
    if report.get("downtime_s") is not None:
        DOWNTIME.labels(strategy).observe(report["downtime_s"])
    if report.get("finished_at") is not None:
        DURATION.labels(strategy).observe(report["finished_at"] - report["started_at"])
    for kind in DATA_KINDS:
        DATA.labels(kind).inc(report.get(f"{kind}_bytes") or 0)
    for finding in report.get("preflight") or []:
        if finding.get("level") == "error":
            PREFLIGHT_REFUSALS.labels(finding["check"]).inc()


class AgentCollector(Collector):
    """What is read from the agent at scrape time: migrations running, QoS class bytes."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("godwit_migrations_running",
                                "Migrations this agent runs as the source now",
                                value=len(self.agent.migrations.running))
        if self.agent.cluster is not None:
            yield CounterMetricFamily("godwit_etcd_requests",
                                      "Requests this agent sent to etcd (retries included)",
                                      value=self.agent.cluster.store.round_trips)
        if self.agent.qos is None:
            return
        sent = CounterMetricFamily("godwit_qos_class_sent_bytes",
                                   "Bytes sent through each class of the migration shaping",
                                   labels=["class"])
        classes = describe_policy(self.agent.qos.uplink).get("classes") or {}
        for name, stats in sorted(classes.items()):
            sent.add_metric([name], stats.get("bytes", 0))
        yield sent


def metrics_handler(agent: Any) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The aiohttp handler of `GET /metrics` for an agent (a thread renders the text: the
    QoS figures come from pyroute2's blocking API)."""
    scraped = CollectorRegistry()
    scraped.register(AgentCollector(agent))

    def render() -> bytes:
        return generate_latest(REGISTRY) + generate_latest(scraped)

    async def handler(request: web.Request) -> web.Response:
        body = await asyncio.to_thread(render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handler
