"""The registry of migration strategies, and the choice `--strategy auto` makes.

A strategy is a `SourceMigration` subclass that declares what it needs and how it differs
(see that class's docstring); it is listed once, in `REGISTRY`. Everything else (the CLI's
choices, pre-flight, the destination's lazy restore, auto) reads the class.
"""

from __future__ import annotations

from godwit.errors import GodwitError
from godwit.migration.post_copy import PostCopy
from godwit.migration.pre_copy import PreCopy
from godwit.migration.source import SourceMigration

AUTO = "auto"
REGISTRY: dict[str, type[SourceMigration]] = {
    cls.strategy: cls for cls in (SourceMigration, PostCopy, PreCopy)}
STRATEGIES = (AUTO, *REGISTRY)  # what an operator may ask for
DEFAULT = SourceMigration.strategy  # auto's choice when no other fits


def strategy_class(name: str) -> type[SourceMigration]:
    try:
        return REGISTRY[name]
    except KeyError:
        choices = ", ".join(STRATEGIES)
        raise GodwitError(f"unknown strategy {name!r} (one of {choices})") from None


def check_strategy(name: str) -> None:
    """An operator may ask for `auto` or a registered strategy."""
    if name != AUTO:
        strategy_class(name)


def restores_lazily(name: str | None) -> bool:
    """Does the destination restore before the memory arrives? (False for a name this
    agent does not know: a request from a newer source is restored whole.)"""
    cls = REGISTRY.get(name or "")
    return bool(cls and cls.lazy_restore)


def upload_rounds(name: str | None) -> int:
    """How many uploads of the memory a strategy makes before the final dump (a name this
    agent does not know: none)."""
    cls = REGISTRY.get(name or "")
    return cls.upload_rounds if cls else 0


def choose_strategy(requested: str, source: dict, dest: dict | None, memory: int) -> str:
    """The strategy to run: the operator's choice, or for `auto` the best the two hosts
    support for a container with `memory` bytes of private anonymous memory (what the
    lazy strategies take out of the freeze). `source`/`dest` are CRIU capabilities."""
    if requested != AUTO:
        cls = strategy_class(requested)
        for need in cls.needs:  # what the source lacks is known before asking the peer
            if need.side == "source" and not need.runc and not source.get(need.feature):
                raise GodwitError(f"{cls.strategy} is not supported on this host: it needs "
                                  f"{need.what}")
        return cls.strategy
    ranked = sorted((cls for cls in REGISTRY.values() if cls.auto_rank is not None),
                    key=lambda cls: cls.auto_rank or 0)
    for cls in ranked:
        if memory >= cls.auto_min_memory and cls.auto_fits(source, dest or {}):
            return cls.strategy
    return DEFAULT
