"""Fixtures: a real testbed of network-namespace hosts with agents, shared per module."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from godwit.lab.netns import pick_free_subnet
from godwit.lab.testbed import Testbed
from godwit.pki import CertificateAuthority
from godwit.runc import CURRENT_RUNC, DEFAULT_RUNC
from godwit.tls import TLSFiles

# helper modules whose asserts report like tests
pytest.register_assert_rewrite("netclient", "faultmatrix", "memhog_container")
# The fast lane, `pytest -m "not integration"`, runs unit tests only (no root, seconds):
# these markers and these root-only fixtures make a test an integration test.
IMPLIES_INTEGRATION = ("realapps", "conformance", "faults", "soak")
ROOT_FIXTURES = frozenset({"bed", "current_bed", "any_bed", "runc_binary"})


@pytest.hookimpl(tryfirst=True)  # before the -m selection
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark integration every test that has an implying marker or uses a root fixture."""
    for item in items:
        implied = any(item.get_closest_marker(name) for name in IMPLIES_INTEGRATION)
        if implied or ROOT_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def _require_runtime() -> None:
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (run scripts/setup and the tests as root)")
    for tool in (DEFAULT_RUNC, "criu", "iptables"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} missing: run scripts/setup first")
    check = subprocess.run(["criu", "check"], capture_output=True, text=True)
    if check.returncode != 0:
        pytest.fail(f"criu check fails: {check.stdout}{check.stderr}".strip())


def _current_runc() -> str:
    """scripts/runc-current's runc; the test is skipped when it is not installed."""
    if not os.access(CURRENT_RUNC, os.X_OK):
        pytest.skip(f"no current runc at {CURRENT_RUNC}: scripts/runc-current could not "
                    "build it (run it to see why)")
    return str(CURRENT_RUNC)


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    """Hosts a and b, their agents on Debian's runc (or $GODWIT_TEST_RUNC)."""
    _require_runtime()
    prefix = f"gwt{os.getpid() % 100000}"
    with Testbed(["a", "b"], prefix=prefix, subnet=pick_free_subnet(),
                 runc=os.environ.get("GODWIT_TEST_RUNC")) as testbed:
        yield testbed


@pytest.fixture(scope="module")
def current_bed() -> Iterator[Testbed]:
    """Hosts a and b, their agents on the current runc (scripts/runc-current)."""
    _require_runtime()
    runc = _current_runc()
    prefix = f"gwc{os.getpid() % 100000}"
    with Testbed(["a", "b"], prefix=prefix, subnet=pick_free_subnet(), runc=runc) as testbed:
        yield testbed


@pytest.fixture(params=["runc-1.1", "runc-current"])
def any_bed(request: pytest.FixtureRequest) -> Testbed:
    """The test runs twice: agents on Debian's runc 1.1 (`bed`), and on the current runc
    (`current_bed`, skipped when scripts/runc-current could not build it)."""
    return request.getfixturevalue("bed" if request.param == "runc-1.1" else "current_bed")


@pytest.fixture(params=["runc-1.1", "runc-current"])
def runc_binary(request: pytest.FixtureRequest) -> str:
    """Debian's runc, then the current one (skipped when it is not installed)."""
    _require_runtime()
    return DEFAULT_RUNC if request.param == "runc-1.1" else _current_runc()


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


def free_port(address: str) -> int:
    """A TCP port nothing listens on at `address` now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> tuple[TLSFiles, TLSFiles]:
    """A CRIU page server's TLS files (its certificate names 127.0.0.1) and a client's."""
    ca = CertificateAuthority(tmp_path_factory.mktemp("ca") / "ca")
    ca.init()
    ca.issue_agent("server", ["127.0.0.1"])
    ca.issue_client("client")
    return ca.bundle_for("server"), ca.bundle_for("client")


TLS_RECORD = 16 << 10  # the most a TLS record carries


def system_calls(strace_summary: Path, name: str) -> int:
    """How many calls of one system call an `strace -c` summary counts."""
    for line in strace_summary.read_text().splitlines():
        if line.split()[-1:] == [name]:
            return int(line.split()[3])
    return 0
