"""Pre-flight refusals end to end: a real source agent, a fake destination agent (real mTLS)
whose clock, CRIU and resources the test controls. Nothing may be frozen or sent."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from conftest import copies, wait_for

from godwit.lab.bundles import counter_bundle, read_count
from godwit.lab.testbed import Testbed
from godwit.protocol import PROTOCOL_VERSION
from godwit.tls import server_context

pytestmark = pytest.mark.integration
FAKE_PORT = 7452


@dataclass
class FakeAgent:
    """What the fake destination reports; `incoming` counts migration attempts reaching it."""

    clock_offset: float = 0.0
    criu_version: str = "4.2.1"
    lazy_pages: bool = True
    disk_free: int = 100 << 30
    protocol: str = PROTOCOL_VERSION
    incoming: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([web.get("/v1/info", self.info), web.get("/v1/time", self.clock),
                        web.post("/v1/preflight/cpuinfo", self.cpuinfo),
                        web.post("/v1/preflight/admission", self.admission),
                        web.post("/v1/incoming", self.refuse)])
        return app

    async def info(self, _: web.Request) -> web.Response:
        criu = {"version": self.criu_version, "check_ok": True, "check_message": "",
                "lazy_pages": self.lazy_pages, "soft_dirty": False}
        return web.json_response({"name": "fake", "godwit": "0", "protocol": self.protocol,
                                  "runc": "1.1.5+ds1", "criu": criu,
                                  "time": time.time() + self.clock_offset, "containers": 0,
                                  "mem_available": 100 << 30, "disk_free": self.disk_free})

    async def clock(self, _: web.Request) -> web.Response:
        now = time.time() + self.clock_offset
        return web.json_response({"received": now, "sent": now})

    async def cpuinfo(self, _: web.Request) -> web.Response:
        return web.json_response({"check": "cpu", "level": "ok", "message": "fake"})

    async def admission(self, _: web.Request) -> web.Response:
        return web.json_response({"check": "admission", "level": "ok", "message": "fake"})

    async def refuse(self, request: web.Request) -> web.Response:
        self.incoming.append(request.path)
        return web.json_response({"error": "fake agent"}, status=400)


@pytest.fixture(scope="module")
def fake(bed: Testbed) -> Iterator[tuple[FakeAgent, str]]:
    """A fake agent on the bridge address of the root namespace, reachable from the hosts."""
    agent = FakeAgent()
    address = bed.net.gateway
    bed.ca.issue_agent("fake", [address])
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(agent.app())
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, address, FAKE_PORT,
                       ssl_context=server_context(bed.ca.bundle_for("fake")))
    loop.run_until_complete(site.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield agent, f"{address}:{FAKE_PORT}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.run_until_complete(runner.cleanup())


@pytest.fixture
def counter(bed: Testbed, fake: tuple[FakeAgent, str]) -> Iterator[str]:
    agent, _ = fake
    agent.clock_offset, agent.criu_version, agent.disk_free = 0.0, "4.2.1", 100 << 30
    agent.lazy_pages, agent.protocol = True, PROTOCOL_VERSION
    agent.incoming.clear()
    bundle = counter_bundle(bed.bundle_dir("pf"))
    assert bed.godwit("run", "pf", "--bundle", str(bundle), "--host", "a").returncode == 0
    wait_for(lambda: read_count(bundle / "rootfs"), what="counter")
    yield "pf"
    bed.godwit("rm", "pf")


def refused(bed: Testbed, fake: tuple[FakeAgent, str], *extra: str) -> dict:
    agent, address = fake
    result = bed.godwit("migrate", "pf", "--to", address, "--json", *extra)
    assert result.returncode != 0
    report = json.loads(result.stdout)
    assert report["result"] == "failed" and "pre-flight refused" in report["error"]
    assert not agent.incoming, "the destination must not be asked to prepare"
    assert "freeze" not in {p["name"] for p in report["phases"]}
    assert copies(bed, "pf") == [("a", "running")]
    return report


def test_clock_skew_above_limit_is_refused(bed, fake, counter) -> None:
    fake[0].clock_offset = 2.0
    report = refused(bed, fake)
    assert "clock" in report["error"] and "ahead" in report["error"]


def test_clock_skew_limit_is_configurable(bed, fake, counter) -> None:
    fake[0].clock_offset = 0.2
    refused(bed, fake, "--max-clock-skew", "0.1")


def test_small_skew_only_warns(bed, fake, counter) -> None:
    fake[0].clock_offset = 0.05
    result = bed.godwit("check", fake[1], "--from", "a", "--json")
    findings = json.loads(result.stdout)["a"]["findings"]
    assert {f["check"]: f["level"] for f in findings}["clock"] == "warn"


def test_another_protocol_major_version_is_refused(bed, fake, counter) -> None:
    fake[0].protocol = f"{int(PROTOCOL_VERSION.split('.')[0]) + 1}.0"
    error = refused(bed, fake)["error"]
    assert error == (f"pre-flight refused: protocol: the destination speaks godwit protocol "
                     f"{fake[0].protocol}, this host {PROTOCOL_VERSION}: run the same godwit "
                     "release on both")


def test_criu_major_version_mismatch_is_refused(bed, fake, counter) -> None:
    fake[0].criu_version = "3.17"
    assert "criu" in refused(bed, fake)["error"].lower()


def test_missing_lazy_pages_refuses_post_copy(bed, fake, counter) -> None:
    fake[0].lazy_pages = False
    assert "lazy pages" in refused(bed, fake, "--strategy", "post-copy")["error"]


def test_low_disk_is_refused(bed, fake, counter) -> None:
    fake[0].disk_free = 1 << 20
    assert "disk" in refused(bed, fake)["error"]


def test_check_command_reports_refusal(bed, fake, counter) -> None:
    fake[0].disk_free = 1 << 20
    result = bed.godwit("check", fake[1], "--from", "a", "--container", "pf")
    assert result.returncode == 1
    assert "disk" in result.stdout and "error" in result.stdout
