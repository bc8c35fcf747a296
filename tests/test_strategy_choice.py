"""`--strategy auto`: which strategy a container of a given dump size gets."""

from __future__ import annotations

import pytest

from godwit.errors import GodwitError
from godwit.migration import AUTO_LAZY_MIN_BYTES
from godwit.migration.post_copy import free_port, release_port
from godwit.migration.strategies import choose_strategy

LAZY = {"lazy_pages": True, "soft_dirty": False}
PLAIN = {"lazy_pages": False, "soft_dirty": False}
MiB = 1 << 20


@pytest.mark.parametrize(("memory", "source", "dest", "expected"), [
    (4 * MiB, LAZY, LAZY, "stop-and-copy"),
    (AUTO_LAZY_MIN_BYTES - 1, LAZY, LAZY, "stop-and-copy"),
    (AUTO_LAZY_MIN_BYTES, LAZY, LAZY, "post-copy"),
    (2048 * MiB, LAZY, LAZY, "post-copy"),
    (2048 * MiB, LAZY, PLAIN, "stop-and-copy"),
    (2048 * MiB, {**LAZY, "soft_dirty": True}, LAZY, "pre-copy"),
])
def test_auto(memory: int, source: dict, dest: dict, expected: str) -> None:
    assert choose_strategy("auto", source, dest, memory) == expected


def test_an_explicit_strategy_is_kept() -> None:
    assert choose_strategy("stop-and-copy", LAZY, LAZY, 2048 * MiB) == "stop-and-copy"


def test_pre_copy_without_dirty_tracking_is_refused() -> None:
    with pytest.raises(GodwitError, match="soft-dirty"):
        choose_strategy("pre-copy", LAZY, LAZY, 64 * MiB)


def test_page_server_ports_are_not_handed_out_twice() -> None:
    """CRIU binds the port only after the freeze: two migrations armed together must not
    both be given the port that is free at that moment."""
    ports = range(47100, 47104)
    first, second = free_port("127.0.0.1", ports), free_port("127.0.0.1", ports)
    assert first != second
    release_port(first)
    assert free_port("127.0.0.1", ports) == first
    release_port(first)
    release_port(second)
