"""Cluster mode's plumbing without etcd: the advertised address, the CLI config."""

from __future__ import annotations

from pathlib import Path

import pytest

from godwit.cluster.node import advertised_address
from godwit.config import CliConfig
from godwit.errors import GodwitError


@pytest.mark.parametrize("listen", ["10.0.0.2:7451", "agent-a.example:7451"])
def test_a_specific_listen_address_is_advertised(listen: str) -> None:
    assert advertised_address(listen, "10.9.9.9:2379") == listen


def test_listening_everywhere_advertises_the_address_towards_etcd() -> None:
    assert advertised_address("0.0.0.0:7451", "127.0.0.1:2379") == "127.0.0.1:7451"


def test_unreachable_etcd_address_is_one_line() -> None:
    with pytest.raises(GodwitError, match=r"^cannot reach etcd at 255\.255\.255\.255:2379: "):
        advertised_address("0.0.0.0:7451", "255.255.255.255:2379")


def test_cli_config_keeps_the_etcd_urls(tmp_path: Path) -> None:
    config = CliConfig(tmp_path / "config.json", {"a": "10.0.0.2:7451"})
    config.etcd = "https://10.0.0.1:2379"
    config.save()
    loaded = CliConfig.load(tmp_path / "config.json")
    assert (loaded.etcd, loaded.hosts) == ("https://10.0.0.1:2379", {"a": "10.0.0.2:7451"})
    assert CliConfig.load(tmp_path / "none.json").etcd is None
