"""The fence watchdog's decision, without a container: it kills an aborted or
uncommitted copy, never a committed one, even once the staging area is gone."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from godwit import fence
from godwit.migration.states import DestinationState


def decide_later(path: Path, decision: DestinationState,
                 then_delete: bool = False) -> threading.Thread:
    def act() -> None:
        time.sleep(0.1)
        fence.decide(path, decision)
        if then_delete:
            path.unlink()

    thread = threading.Thread(target=act)
    thread.start()
    return thread


def test_an_uncommitted_copy_is_fenced_at_the_deadline(tmp_path: Path) -> None:
    decision = tmp_path / "decision"
    decision.write_text(DestinationState.PENDING)
    assert fence._must_kill(decision, time.monotonic() + 0.3)
    assert fence.read_decision(decision) == DestinationState.FENCED


def test_a_committed_copy_survives_its_staging_area_going(tmp_path: Path) -> None:
    decision = tmp_path / "decision"
    decision.write_text(DestinationState.PENDING)
    committer = decide_later(decision, DestinationState.COMMITTED, then_delete=True)
    assert not fence._must_kill(decision, time.monotonic() + 1)
    committer.join()
    assert not decision.exists()


def test_an_aborted_copy_is_killed_too(tmp_path: Path) -> None:
    decision = tmp_path / "decision"
    decision.write_text(DestinationState.PENDING)
    aborter = decide_later(decision, DestinationState.ABORTED)
    assert fence._must_kill(decision, time.monotonic() + 5)
    aborter.join()


def test_a_decision_dropped_before_the_watchdog_started_reads_as_aborted(
        tmp_path: Path) -> None:
    assert fence._must_kill(tmp_path / "gone", time.monotonic() + 5)
