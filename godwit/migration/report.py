"""The record of one migration: phases, downtime, bytes, outcome; and its event stream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from godwit.fsio import replace_file
from godwit.metrics import observe_migration
from godwit.migration.states import Result
from godwit.protocol import (
    Event,
    LogEvent,
    PhaseEvent,
    ProgressEvent,
    Report,
    ResultEvent,
    convert,
)


@dataclass
class Phase:
    name: str
    started: float
    ended: float | None = None

    @property
    def seconds(self) -> float:
        return (self.ended or time.time()) - self.started


@dataclass
class MigrationReport:
    """Everything an operator wants to know about one migration afterwards."""

    id: str
    container: str
    source: str
    destination: str
    strategy: str
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    result: Result = Result.RUNNING
    error: str | None = None
    outcome: str = ""  # where the container runs afterwards, in words
    frozen_at: float | None = None
    resumed_at: float | None = None
    downtime_s: float | None = None
    max_freeze_s: float | None = None  # the freeze deadline this migration ran under
    image_bytes: int = 0
    rootfs_bytes: int = 0
    wire_bytes: int = 0
    held_packets: int = 0
    pages: str | None = None  # what the page transfer did (post-copy, streamed dump)
    image: str | None = None  # the container's image reference and manifest digest
    image_digest: str | None = None
    options: dict = field(default_factory=dict)
    preflight: list[dict] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return (self.finished_at or time.time()) - self.started_at

    def to_json(self) -> dict:
        data = asdict(self)
        data["total_s"] = self.total_s
        for phase, raw in zip(self.phases, data["phases"], strict=True):
            raw["seconds"] = phase.seconds
        return data

    def to_wire(self) -> Report:
        return convert(self.to_json(), Report, "report")

    @classmethod
    def from_json(cls, data: dict) -> MigrationReport:
        data = {k: v for k, v in data.items() if k != "total_s"}
        phases = [Phase(p["name"], p["started"], p["ended"]) for p in data.pop("phases", [])]
        return cls(**{**data, "result": Result(data.get("result", Result.RUNNING))},
                   phases=phases)


class EventStream:
    """Progress of a running migration, consumed by the HTTP handler as NDJSON lines."""

    def __init__(self, report: MigrationReport) -> None:
        self.report = report
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self.on_event: Callable[[], None] | None = None  # told of every event (progress)

    def emit(self, event: Event) -> None:
        self.queue.put_nowait(event)
        if self.on_event:
            self.on_event()

    @contextmanager
    def phase(self, name: str) -> Iterator[Phase]:
        """Time a phase and tell the client when it starts and ends."""
        phase = Phase(name, time.time())
        self.report.phases.append(phase)
        self.emit(PhaseEvent(at=time.time(), name=name, state="start"))
        try:
            yield phase
        finally:
            phase.ended = time.time()
            self.emit(PhaseEvent(at=phase.ended, name=name, state="end", seconds=phase.seconds))

    def progress(self, name: str, done: int, total: int) -> None:
        self.emit(ProgressEvent(at=time.time(), name=name, done=done, total=total))

    def log(self, message: str) -> None:
        self.emit(LogEvent(at=time.time(), message=message))

    def close(self) -> None:
        self.emit(ResultEvent(at=time.time(), report=self.report.to_wire()))
        self.queue.put_nowait(None)


class ReportArchive:
    """Finished migration reports kept by an agent, one JSON file each."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def save(self, report: MigrationReport) -> None:
        path = self.directory / f"{report.id}.json"
        replace_file(path, json.dumps(report.to_json(), indent=1), 0o644)
        observe_migration(report.to_json())

    def load(self, migration_id: str) -> dict | None:
        path = self.directory / f"{migration_id}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def all(self) -> list[dict]:
        reports = [json.loads(p.read_text()) for p in self.directory.glob("*.json")]
        return sorted(reports, key=lambda r: r["started_at"])
