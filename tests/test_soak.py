"""A short soak (bench/soak.py): 10 round trips of a TCP server under a continuous client,
both strategies alternating; no migration may fail, the client's stream must stay intact
and nothing the hosts hold may grow (fds, netns, mounts, iptables, cgroups, runc state,
state-dir files and bytes)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import soak

pytestmark = [pytest.mark.integration, pytest.mark.soak]
ROUND_TRIPS = 10


def test_short_soak_has_no_failure_and_no_growth() -> None:
    result = soak.run(ROUND_TRIPS)
    soak.print_table(result, ROUND_TRIPS)
    assert soak.failures(result) == []
    assert soak.client_errors(result) == []
    assert len(result["migrations"]) == 2 * (ROUND_TRIPS + 1)
    assert soak.growth(result) == {}
