"""The lab's etcd members get distinct ports: a member that found its port taken by
another member's failed to start (seen once in CI: "bind: address already in use")."""

from __future__ import annotations

import random

from godwit.lab import etcd


def test_members_never_share_a_port(monkeypatch) -> None:
    """Even when every pick sees the same candidates (as separate picks for each member
    could: no member had bound its ports yet), the members' ports are all distinct."""
    monkeypatch.setattr(random, "sample", lambda population, k: list(population)[:k])
    ports = [p for pair in etcd.member_ports("127.0.0.1", 3) for p in pair]
    assert len(set(ports)) == 6
