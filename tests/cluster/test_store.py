"""The etcd connection: keys, revisions, and a clear error (no hang) when etcd is gone."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from godwit.cluster.store import ClusterUnavailable, Store, encode, parse_endpoints
from godwit.errors import GodwitError
from godwit.lab.etcd import EtcdCluster
from godwit.pki import CertificateAuthority


def test_endpoints_from_urls() -> None:
    assert parse_endpoints("https://10.0.0.1:2379, https://10.0.0.2:2380") == [
        "10.0.0.1:2379", "10.0.0.2:2380"]


@pytest.mark.parametrize("urls", ["", "http://10.0.0.1:2379", "https://10.0.0.1",
                                  "10.0.0.1:2379", "https://10.0.0.1:port"])
def test_bad_urls_are_one_line_errors(urls: str) -> None:
    with pytest.raises(GodwitError) as error:
        parse_endpoints(urls)
    assert "\n" not in str(error.value)


def test_values_are_canonical_json() -> None:
    assert encode({"b": 1, "a": "x"}) == encode({"a": "x", "b": 1}) == b'{"a":"x","b":1}'


@pytest.mark.integration
def test_keys_and_revisions(etcd: EtcdCluster, prefix: str) -> None:
    async def scenario() -> None:
        async with Store(etcd.urls, etcd.client_tls, prefix=prefix) as store:
            first = await store.put("hosts/a", {"address": "10.0.0.2:7070"})
            second = await store.put("hosts/b", {"address": "10.0.0.3:7070"})
            assert second > first
            entry = await store.get("hosts/a")
            assert entry and entry.value == {"address": "10.0.0.2:7070"}
            assert entry.mod_revision == first and entry.lease == 0
            assert [e.key for e in await store.list("hosts/")] == ["hosts/a", "hosts/b"]
            assert await store.delete("hosts/a")
            assert await store.get("hosts/a") is None
            assert not await store.delete("hosts/a")

    asyncio.run(scenario())


@pytest.mark.integration
def test_tls_without_a_certificate_of_the_ca_is_refused(etcd: EtcdCluster, prefix: str,
                                                      tmp_path) -> None:
    """A client certificate from another CA: etcd refuses the handshake, one clear line."""
    other = CertificateAuthority(tmp_path / "other")
    other.init("another CA")
    other.issue_client("intruder")
    files = other.bundle_for("intruder")

    async def scenario() -> None:
        async with Store(etcd.urls, files, prefix=prefix, timeout=2):
            pass

    with pytest.raises(ClusterUnavailable) as error:
        asyncio.run(scenario())
    assert "\n" not in str(error.value)


def _connect_fails_quickly(cluster: EtcdCluster, timeout: float) -> str:
    async def scenario() -> None:
        async with Store(cluster.urls, cluster.client_tls, timeout=timeout):
            pass

    started = time.monotonic()
    with pytest.raises(ClusterUnavailable) as error:
        asyncio.run(scenario())
    elapsed = time.monotonic() - started
    assert elapsed < timeout + 1.5, f"took {elapsed:.1f} s"
    message = str(error.value)
    assert "\n" not in message and cluster.urls in message, message
    return message


@pytest.mark.integration
def test_stopped_etcd_is_a_quick_clear_error(ca: CertificateAuthority) -> None:
    with EtcdCluster(ca, size=1, prefix="gwdown") as cluster:
        cluster.kill_member(cluster.members[0])
        assert "refused" in _connect_fails_quickly(cluster, timeout=2).lower()


@pytest.mark.integration
def test_frozen_etcd_is_a_quick_clear_error(ca: CertificateAuthority) -> None:
    """etcd's process stopped (SIGSTOP): the TCP connection opens, nothing answers."""
    with EtcdCluster(ca, size=1, prefix="gwfrozen") as cluster:
        process = cluster.members[0].process
        process.send_signal(signal.SIGSTOP)
        try:
            assert "no answer" in _connect_fails_quickly(cluster, timeout=2)
        finally:
            process.send_signal(signal.SIGCONT)
