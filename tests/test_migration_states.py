"""Migration states without a container: the destination's states, saved in its staging
area."""

from __future__ import annotations

import json
from pathlib import Path

from godwit import fence
from godwit.migration.receiver import STATE, Receiver
from godwit.migration.states import DestinationState, Result


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
