"""Fixtures: a real testbed of network-namespace hosts with agents, shared per module."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from godwit.netns import pick_free_subnet
from godwit.testbed import Testbed

pytest.register_assert_rewrite("netclient", "faultmatrix")  # asserts report like tests


def _require_runtime() -> None:
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (run scripts/setup and the tests as root)")
    for tool in ("runc", "criu", "iptables"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} missing: run scripts/setup first")
    check = subprocess.run(["criu", "check"], capture_output=True, text=True)
    if check.returncode != 0:
        pytest.fail(f"criu check fails: {check.stdout}{check.stderr}".strip())


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    """Hosts a, b and c (c without containers: a spare destination)."""
    _require_runtime()
    prefix = f"gwt{os.getpid() % 100000}"
    with Testbed(["a", "b"], prefix=prefix, subnet=pick_free_subnet()) as testbed:
        yield testbed


def wait_for(predicate: Callable[[], object], timeout: float = 20, what: str = "condition"):
    """Poll until predicate() is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def cli_json(bed: Testbed, *args: str) -> dict:
    result = bed.godwit(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def copies(bed: Testbed, name: str) -> list[tuple[str, str]]:
    """(host, status) of every copy of a container on every host."""
    listing = cli_json(bed, "ps")
    assert not listing["errors"], listing["errors"]
    return [(c["host"], c["status"]) for c in listing["containers"] if c["name"] == name]
