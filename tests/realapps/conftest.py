"""Fixtures of the real-applications suite: the cached Debian rootfs and a client host."""

from __future__ import annotations

from pathlib import Path

import pytest

from godwit.lab.netns import TestHost
from godwit.lab.testbed import Testbed
from realapps.rootfs import cached_rootfs


@pytest.fixture(scope="session")
def app_rootfs() -> Path:
    """The Debian rootfs with redis, nginx and PostgreSQL (built on the first run)."""
    try:
        return cached_rootfs()
    except (RuntimeError, OSError) as exc:
        pytest.fail(f"cannot build the real-applications rootfs: {exc}")


@pytest.fixture(scope="module")
def client_host(bed: Testbed) -> TestHost:
    """Host c: the load generators run here, on the hosts' segment, outside a and b."""
    return bed.net.add_host("c")
