"""Migration states without a container: the source's stage order, its journal on disk
(this format and the earlier one), the destination's states, and the strategy registry."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest

from godwit import fence
from godwit.errors import GodwitError
from godwit.migration import MigrationOptions
from godwit.migration.journal import FILE, Journal, Journals
from godwit.migration.post_copy import PostCopy
from godwit.migration.pre_copy import PreCopy
from godwit.migration.receiver import STATE, Receiver
from godwit.migration.source import SourceMigration
from godwit.migration.states import DestinationState, Result, Stage
from godwit.migration.strategies import (
    REGISTRY,
    STRATEGIES,
    choose_strategy,
    restores_lazily,
    strategy_class,
)
from godwit.preflight import compare_criu

OPTIONS = MigrationOptions(to="10.0.0.2:7451", strategy="post-copy").to_json()


def test_stages_are_ordered_as_a_migration_goes() -> None:
    order = [Stage.NEW, Stage.PREPARED, Stage.FROZEN, Stage.ISOLATED, Stage.RESTORE_SENT,
             Stage.RESTORED, Stage.COMMIT_SENT]
    assert sorted(Stage) == order
    assert all(a < b for a, b in itertools.pairwise(order))
    assert [Stage.from_label(s.label) for s in Stage] == list(Stage)
    with pytest.raises(ValueError, match="unknown migration stage"):
        Stage.from_label("teleported")


def test_a_journal_round_trips_through_its_file(tmp_path: Path) -> None:
    journals = Journals(tmp_path)
    journal = Journal("a1", "web", "post-copy", OPTIONS, Stage.RESTORE_SENT,
                      {"page_server_pid": 42, "page_server_start": 7})
    journals.save(journal)
    path = tmp_path / "outgoing" / "a1" / FILE
    assert json.loads(path.read_text())["stage"] == "restore_sent"
    assert path.stat().st_mode & 0o777 == 0o600
    assert journals.all() == [journal]
    assert journals.of("web") == [journal] and journals.of("db") == []
    journal.stage = Stage.COMMIT_SENT
    journals.save(journal)
    assert journals.all()[0].stage is Stage.COMMIT_SENT
    journals.discard("a1")
    assert journals.all() == [] and journals.work_dir("a1").is_dir()
    journals.drop("a1")
    assert not journals.work_dir("a1").exists()


@pytest.mark.parametrize(("flags", "stage"), [
    ({"prepared": True}, Stage.PREPARED),
    ({"prepared": True, "frozen": True}, Stage.FROZEN),
    ({"prepared": True, "frozen": True, "isolated": True}, Stage.ISOLATED),
    ({"prepared": True, "frozen": True, "restore_sent": True}, Stage.RESTORE_SENT),
    ({"prepared": True, "frozen": True, "isolated": True, "restore_sent": True,
      "restored": True}, Stage.RESTORED),
    ({"prepared": True, "frozen": True, "restore_sent": True, "restored": True,
      "commit_sent": True}, Stage.COMMIT_SENT),
])
def test_a_journal_of_the_earlier_format_is_read(tmp_path: Path, flags: dict,
                                                 stage: Stage) -> None:
    """An agent upgraded with a migration in flight settles it from the old journal."""
    old = {"id": "b2", "name": "web", "strategy": "post-copy", "options": OPTIONS, **flags,
           "page_server_pid": 42, "page_server_start": 7}
    (tmp_path / "outgoing" / "b2").mkdir(parents=True)
    (tmp_path / "outgoing" / "b2" / FILE).write_text(json.dumps(old))
    [journal] = Journals(tmp_path).all()
    assert journal.stage is stage
    assert journal.extra == {"page_server_pid": 42, "page_server_start": 7}
    assert journal.options == OPTIONS


def test_an_unreadable_journal_does_not_hide_the_others(tmp_path: Path) -> None:
    journals = Journals(tmp_path)
    journals.save(Journal("c3", "web", "stop-and-copy", OPTIONS, Stage.FROZEN))
    (tmp_path / "outgoing" / "c2").mkdir()
    (tmp_path / "outgoing" / "c2" / FILE).write_text("{not json")
    assert [j.id for j in journals.all()] == ["c3"]


def test_destination_states() -> None:
    before = {DestinationState.PREPARED, DestinationState.ARMED}
    decided = {DestinationState.COMMITTED, DestinationState.ABORTED, DestinationState.FENCED}
    assert {s for s in DestinationState if s.before_restore} == before
    assert {s for s in DestinationState if s.restored} == decided | {DestinationState.PENDING}
    assert {s for s in DestinationState if s.finished} == decided
    assert json.dumps({"state": DestinationState.ARMED}) == '{"state": "armed"}'
    assert json.dumps(Result.IN_DOUBT) == '"in-doubt"'


def test_the_destination_state_is_saved_not_inferred(tmp_path: Path) -> None:
    staging = tmp_path / "abc"
    assert Receiver._state(staging) is DestinationState.UNKNOWN
    staging.mkdir()
    assert Receiver._state(staging) is DestinationState.PREPARED  # an earlier agent's
    Receiver._set_state(staging, DestinationState.ARMED)
    assert Receiver._state(staging) is DestinationState.ARMED
    (staging / STATE).write_text(DestinationState.PENDING)  # the fence's, at the restore
    assert fence.decide(staging / STATE, DestinationState.COMMITTED) == "committed"
    assert Receiver._state(staging) is DestinationState.COMMITTED
    assert fence.decide(staging / STATE, DestinationState.ABORTED) is \
        DestinationState.COMMITTED


def test_the_registry_names_every_strategy_once() -> None:
    assert STRATEGIES == ("auto", "stop-and-copy", "post-copy", "pre-copy")
    assert list(REGISTRY.items()) == [("stop-and-copy", SourceMigration),
                                      ("post-copy", PostCopy), ("pre-copy", PreCopy)]
    assert [name for name in REGISTRY if restores_lazily(name)] == ["post-copy"]
    assert not restores_lazily(None) and not restores_lazily("from-a-newer-source")
    with pytest.raises(GodwitError, match=r"unknown strategy 'warp' \(one of auto, "):
        strategy_class("warp")
    with pytest.raises(GodwitError, match="unknown strategy"):
        choose_strategy("warp", {}, {}, 0)


def info(**criu: bool) -> dict:
    return {"criu": {"version": "4.2.1", "lazy_pages": True, "soft_dirty": True, **criu},
            "runc": "1.1.5", "runc_features": {"checkpoint": True, "lazy_dump": True,
                                               "lazy_restore": True, "pre_dump": True}}


@pytest.mark.parametrize("strategy", list(REGISTRY.values()))
def test_pre_flight_checks_what_each_strategy_declares(strategy: type[SourceMigration]) -> None:
    """Every declared need, taken away on its side, is a refusal naming the strategy; a
    host lacking only what the strategy does not need passes."""
    assert all(f.level == "ok" for f in compare_criu(info(), info(), strategy))
    for need in strategy.needs:
        lacking = info()
        lacking["runc_features" if need.runc else "criu"][need.feature] = False
        sides = (lacking, info()) if need.side == "source" else (info(), lacking)
        errors = [f.message for f in compare_criu(*sides, strategy) if f.level == "error"]
        assert len(errors) == 1 and strategy.strategy in errors[0], (need, errors)
    needed = {n.feature for n in strategy.needs}
    spare = info(**{f: False for f in ("lazy_pages", "soft_dirty") if f not in needed})
    assert all(f.level == "ok" for f in compare_criu(spare, spare, strategy))


@pytest.mark.parametrize(("restored_ago", "left"), [(None, 0.2), (0.05, 0.15), (3.0, 0.0)])
def test_verify_settles_from_the_restore(restored_ago: float | None, left: float) -> None:
    """The restored copy must run SETTLE_S past its restore; post-copy's page transfer
    already spent that time, and after an agent restart the moment starts again."""
    migration = SourceMigration.__new__(SourceMigration)
    now = time.monotonic()
    migration.restored_at = None if restored_ago is None else now - restored_ago
    assert left - 0.1 <= migration.settle_left() <= left  # less by the time since `now`
