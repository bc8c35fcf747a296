"""QoS under a migration storm: agents shape their migration traffic with HTB, so while a
host is evacuated another flow on the same uplink keeps its guaranteed rate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from statistics import median

import pytest
from conftest import _require_runtime, cli_json, wait_for
from test_qos import FLOWS

from godwit import qos
from godwit.lab.netns import pick_free_subnet
from godwit.lab.testbed import Testbed
from godwit.lab.workloads import memhog_bundle, read_state
from godwit.qos import QosPolicy

pytestmark = pytest.mark.integration
LINK, MIGRATION = 800, 200
OTHER_PORT = 5201
PAYLOAD = 0.95  # HTB shapes Ethernet frames; the receiver counts TCP payload
GUARANTEED = (LINK - MIGRATION) * PAYLOAD * 0.9


@pytest.fixture(scope="module")
def shaped() -> Iterator[Testbed]:
    _require_runtime()
    qos = ["--qos-uplink", "eth0", "--qos-link-mbit", str(LINK),
           "--qos-migration-mbit", str(MIGRATION)]
    with Testbed(["a", "b"], prefix=f"gwq{os.getpid() % 100000}", subnet=pick_free_subnet(),
                 agent_args=qos) as bed:
        yield bed


def start_other_flow(bed: Testbed, src: str, dst: str, start: float,
                     end: float) -> subprocess.Popen:
    """A bulk TCP flow src → dst on a non-agent port; returns the receiver (prints Mbit/s)."""
    a, b = bed.host(src), bed.host(dst)
    flows = json.dumps([[OTHER_PORT, False]])
    times = [str(start), str(end)]
    recv = bed.net.run_in(b, [sys.executable, "-c", FLOWS, "recv", a.address, *times, flows],
                          stdout=subprocess.PIPE, text=True)
    bed.net.run_in(a, [sys.executable, "-c", FLOWS, "send", b.address, *times, flows])
    return recv


def migration_bytes(bed: Testbed, host: str) -> int:
    return cli_json(bed, "hosts")[host]["qos"]["classes"]["migration"]["bytes"]


def evacuate_under_load(bed: Testbed, src: str, dst: str) -> tuple[float, int]:
    """Evacuate src while another flow src → dst runs; (its median Mbit/s, migration bytes)."""
    before = migration_bytes(bed, src)
    start = time.monotonic() + 1.5
    recv = start_other_flow(bed, src, dst, start, start + 3.0)
    evacuation = subprocess.Popen(
        [sys.executable, "-m", "godwit", "evacuate", src, "--to", dst, "--parallel", "2",
         "--json"], env={**os.environ, "GODWIT_CONFIG": str(bed.config_path)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, _ = recv.communicate(timeout=60)
    still_migrating = evacuation.poll() is None
    evac_out, evac_err = evacuation.communicate(timeout=300)
    assert evacuation.returncode == 0, evac_err or evac_out
    assert all(o["result"] == "ok" for o in json.loads(evac_out))
    assert still_migrating, "the evacuation must overlap the measured window"
    return median(json.loads(out)[str(OTHER_PORT)]), migration_bytes(bed, src) - before


def test_other_traffic_keeps_its_share_during_an_evacuation(shaped: Testbed) -> None:
    info = cli_json(shaped, "hosts")["a"]["qos"]
    assert info["active"] and info["classes"]["migration"]["rate_mbit"] == MIGRATION
    for name in ("e1", "e2"):
        bundle = memhog_bundle(shaped.bundle_dir(name), 128, dirty_pps=0)
        assert shaped.godwit("run", name, "--bundle", str(bundle), "--host", "a").returncode == 0
        wait_for(lambda r=bundle / "rootfs": read_state(r).get("status") == "ready", timeout=60,
                 what=f"{name} ready")
    other, moved = evacuate_under_load(shaped, "a", "b")
    print(f"\nshaped: other flow {other:.0f} Mbit/s (guaranteed {LINK - MIGRATION}), "
          f"migration class carried {moved / 2**20:.0f} MiB")
    assert moved > 200 << 20, "migration traffic was not classified as such"
    assert other >= GUARANTEED

    # Control: same link, but b's filter matches a port nobody uses, so migration traffic
    # lands in the default class with the other flow, which then loses its guarantee.
    unmatched = QosPolicy(LINK, MIGRATION, LINK, agent_port=9000)
    qos.apply_policy("eth0", unmatched, netns=shaped.host("b").netns)
    other, _ = evacuate_under_load(shaped, "b", "a")
    print(f"unclassified: other flow {other:.0f} Mbit/s")
    assert other < GUARANTEED, "without classification the guarantee should not hold"
