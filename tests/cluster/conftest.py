"""Fixtures: real etcd members (Debian's etcd-server) with TLS of a throwaway godwit CA."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from godwit.lab.etcd import ETCD_BINARY, EtcdCluster
from godwit.pki import CertificateAuthority


@pytest.fixture(scope="module")
def ca() -> Iterator[CertificateAuthority]:
    work = Path(tempfile.mkdtemp(prefix="godwit-etcd-ca-", dir="/var/tmp"))
    authority = CertificateAuthority(work / "ca")
    authority.init("godwit etcd tests")
    yield authority
    shutil.rmtree(work, ignore_errors=True)


def _require_etcd() -> None:
    if not shutil.which(ETCD_BINARY):
        pytest.fail("etcd missing: run scripts/setup (Debian's etcd-server)")


@pytest.fixture(scope="module")
def etcd(ca: CertificateAuthority) -> Iterator[EtcdCluster]:
    """One etcd member for the module; tests keep apart by a key prefix of their own."""
    _require_etcd()
    with EtcdCluster(ca, size=1, prefix=f"gwe{os.getpid() % 100000}") as cluster:
        yield cluster


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:8]}/"
