"""/metrics: Prometheus text from the official client, parsed back with its parser."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator

import pytest
from conftest import _require_runtime
from prometheus_client.parser import text_string_to_metric_families

from godwit import metrics
from godwit.lab.bundles import counter_bundle
from godwit.lab.netns import pick_free_subnet
from godwit.lab.testbed import Testbed
from godwit.tls import client_context


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of an exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(parsed: dict, name: str, **labels: str) -> float:
    return parsed.get((name, tuple(sorted(labels.items()))), 0.0)


def test_a_finished_report_is_counted() -> None:
    """A refused migration: counted as failed, by strategy, with its failed check."""
    def exposition() -> dict:
        return samples(metrics.generate_latest(metrics.REGISTRY).decode())

    before = exposition()
    metrics.observe_migration({
        "strategy": "pre-copy", "result": "failed", "started_at": 100.0, "finished_at": 100.3,
        "downtime_s": None, "image_bytes": 0, "rootfs_bytes": 0, "wire_bytes": 1234,
        "preflight": [{"check": "clock", "level": "ok", "message": ""},
                      {"check": "disk", "level": "error", "message": "no room"}]})
    after = exposition()

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("godwit_migrations_total", result="failed", strategy="pre-copy") == 1
    assert grew("godwit_migration_preflight_refusals_total", check="disk") == 1
    assert grew("godwit_migration_preflight_refusals_total", check="clock") == 0
    assert grew("godwit_migration_data_processed_bytes_total", kind="wire") == 1234
    assert grew("godwit_migration_duration_seconds_count", strategy="pre-copy") == 1
    assert grew("godwit_migration_duration_seconds_bucket", strategy="pre-copy", le="0.5") == 1
    assert grew("godwit_migration_downtime_seconds_count", strategy="pre-copy") == 0


def scrape(bed: Testbed, host: str) -> tuple[str, str]:
    url = f"https://{bed.address(host)}/metrics"
    with urllib.request.urlopen(url, timeout=10,
                                context=client_context(bed.operator_tls)) as answer:
        return answer.headers["Content-Type"], answer.read().decode()


@pytest.mark.integration
def test_agent_serves_its_migrations_as_prometheus_metrics(bed: Testbed) -> None:
    content_type, text = scrape(bed, "a")
    assert content_type.startswith("text/plain")
    before = samples(text)
    assert value(before, "godwit_migrations_running") == 0

    result = bed.godwit("run", "metered", "--bundle",
                        str(counter_bundle(bed.bundle_dir("metered"))), "--host", "a")
    assert result.returncode == 0, result.stderr
    result = bed.godwit("migrate", "metered", "--to", "b", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    after = samples(scrape(bed, "a")[1])
    strategy = report["strategy"]

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("godwit_migrations_total", result="ok", strategy=strategy) == 1
    assert grew("godwit_migration_downtime_seconds_count", strategy=strategy) == 1
    assert grew("godwit_migration_downtime_seconds_sum", strategy=strategy) == pytest.approx(
        report["downtime_s"])
    assert grew("godwit_migration_duration_seconds_count", strategy=strategy) == 1
    for kind in ("image", "rootfs", "wire"):
        assert grew("godwit_migration_data_processed_bytes_total", kind=kind) == report[
            f"{kind}_bytes"] > 0
    assert value(after, "godwit_migrations_running") == 0
    # the destination ran no migration as the source
    assert value(samples(scrape(bed, "b")[1]), "godwit_migrations_total", result="ok",
                 strategy=strategy) == 0
    bed.godwit("rm", "metered")


@pytest.fixture(scope="module")
def shaped() -> Iterator[Testbed]:
    """Agents that shape their migration traffic (HTB on eth0)."""
    _require_runtime()
    qos = ["--qos-uplink", "eth0", "--qos-link-mbit", "800", "--qos-migration-mbit", "200"]
    with Testbed(["a"], prefix=f"gwm{os.getpid() % 100000}", subnet=pick_free_subnet(),
                 agent_args=qos) as testbed:
        yield testbed


@pytest.mark.integration
def test_qos_class_bytes(shaped: Testbed) -> None:
    """The agent's own answers leave from its port, in the migration class: each scrape
    sees the bytes of the previous one."""
    def sent() -> dict[str, float]:
        parsed = samples(scrape(shaped, "a")[1])
        return {dict(labels)["class"]: v for (name, labels), v in parsed.items()
                if name == "godwit_qos_class_sent_bytes_total"}

    first = sent()
    assert set(first) == {"link", "migration", "default"}, first
    second = sent()
    assert second["migration"] > first["migration"]
    assert second["link"] >= second["migration"]
