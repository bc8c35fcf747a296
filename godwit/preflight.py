"""Pre-flight checks before a container is frozen: clocks, CRIU/runc, CPU, resources.

Every check returns :class:`Finding` s; :func:`verdict` says whether the migration may go on.
The host facts are the agents' ``/v1/info`` replies (protocol.HostInfo), read here as
plain dicts (``criu``, ``runc``, ``runc_features``, ``mem_available``, ``disk_free``).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol

import msgspec

from godwit.criu import run_criu
from godwit.errors import GodwitError
from godwit.runc_features import series

if TYPE_CHECKING:
    from godwit.protocol import HostInfo, IncomingRequest

Level = Literal["ok", "warn", "error"]
Side = Literal["source", "destination"]
Sample = tuple[float, float, float, float]  # t1 client send, t2 server recv, t3 server send, t4
SKEW_WARN_S = 0.010
SKEW_LIMIT_S = 0.500
HEADROOM = 0.10  # warn when a resource would be more than 90 % used
CPUINFO_IMAGE = "cpuinfo.img"


@dataclass(frozen=True)
class Finding:
    check: str
    level: Level
    message: str

    def to_json(self) -> dict:
        return {"check": self.check, "level": self.level, "message": self.message}


@dataclass(frozen=True)
class Need:
    """A host feature a migration strategy needs on one side: a CRIU capability (the
    `criu` facts of /v1/info) or, with `runc`, a runc feature (`runc_features`)."""

    side: Side
    feature: str
    what: str  # in words, for the refusal
    runc: bool = False


class Strategy(Protocol):
    """What pre-flight asks of a strategy (the classes of `godwit.migration.strategies`)."""

    strategy: ClassVar[str]
    needs: ClassVar[tuple[Need, ...]]


@dataclass(frozen=True)
class SkewResult:
    """Server clock minus client clock, and the round trip it was measured over (seconds)."""

    offset_s: float
    delay_s: float
    samples: int


def verdict(findings: Iterable[Finding]) -> bool:
    """True when no finding is an error."""
    return all(f.level != "error" for f in findings)


# clocks
def offset_from_samples(samples: list[Sample]) -> tuple[float, float]:
    """NTP (offset, delay) of the sample with the smallest delay."""
    if not samples:
        raise ValueError("no time samples")

    def delay(s: Sample) -> float:
        return (s[3] - s[0]) - (s[2] - s[1])

    t1, t2, t3, t4 = min(samples, key=delay)
    return ((t2 - t1) + (t3 - t4)) / 2, delay((t1, t2, t3, t4))


async def measure_skew(
    get_server_times: Callable[[], Awaitable[tuple[float, float]]], samples: int = 8
) -> SkewResult:
    """Ask the server ``samples`` times for its (receive, send) times; see offset_from_samples."""
    taken: list[Sample] = []
    for _ in range(samples):
        t1 = time.time()
        t2, t3 = await get_server_times()
        taken.append((t1, t2, t3, time.time()))
    offset, delay = offset_from_samples(taken)
    return SkewResult(offset, delay, len(taken))


def check_skew(skew: SkewResult, limit_s: float = SKEW_LIMIT_S) -> Finding:
    """Warn above 10 ms, refuse above ``limit_s`` (timestamps in reports come from both hosts)."""
    size = abs(skew.offset_s)
    side = "ahead of" if skew.offset_s > 0 else "behind"
    message = (f"destination clock {size * 1e3:.1f} ms {side} the source "
               f"(±{skew.delay_s / 2 * 1e3:.1f} ms)")
    level: Level = "error" if size > limit_s else "warn" if size > SKEW_WARN_S else "ok"
    return Finding("clock", level, message)


# protocol
def check_protocol(local: str, remote: str) -> Finding:
    """Agents of different major protocol versions do not understand each other's bodies."""
    if local.split(".")[0] != remote.split(".")[0]:
        return Finding("protocol", "error", f"the destination speaks godwit protocol {remote}, "
                       f"this host {local}: run the same godwit release on both")
    return Finding("protocol", "ok", f"godwit protocol {local} -> {remote}")


# CRIU and runc
def compare_criu(local_info: dict, remote_info: dict, strategy: Strategy) -> list[Finding]:
    """Can images dumped by the local (source) CRIU be restored by the remote (destination)?"""
    local, remote = local_info.get("criu") or {}, remote_info.get("criu") or {}
    findings = [_criu_versions(local.get("version"), remote.get("version"))]
    if remote and not remote.get("check_ok", True):
        findings.append(Finding("criu", "warn", "`criu check` fails on the destination: "
                                f"{remote.get('check_message', '')}"))
    for need in strategy.needs:
        facts = local if need.side == "source" else remote
        if not need.runc and not facts.get(need.feature):
            findings.append(Finding(need.feature.replace("_", "-"), "error",
                                    f"{strategy.strategy} needs {need.what} on the {need.side}"))
    findings.append(_runc_versions(local_info.get("runc"), remote_info.get("runc")))
    return findings + compare_runc(local_info.get("runc_features"),
                                   remote_info.get("runc_features"), strategy)


def _criu_versions(local: str | None, remote: str | None) -> Finding:
    lv, rv = _version(local), _version(remote)
    if lv is None or rv is None:
        return Finding("criu", "error", f"CRIU version unknown: source {local}, dest {remote}")
    if lv[0] != rv[0]:
        return Finding("criu", "error", f"CRIU major versions differ: {local} -> {remote}")
    if rv < lv:
        return Finding("criu", "warn", f"destination CRIU {remote} is older than {local}")
    return Finding("criu", "ok", f"CRIU {local} -> {remote}")


def _runc_versions(local: str | None, remote: str | None) -> Finding:
    """runc's feature releases are its minor versions (1.1, 1.3): warn when they differ."""
    if local == remote:
        return Finding("runc", "ok", f"runc {local} on both hosts")
    if series(local) is not None and series(local) == series(remote):
        return Finding("runc", "ok", f"runc {local} -> {remote}")
    return Finding("runc", "warn", f"runc versions differ: {local} -> {remote}")


def compare_runc(local: dict | None, remote: dict | None,
                 strategy: Strategy) -> list[Finding]:
    """Can the source's runc dump and the destination's restore as `strategy` needs?
    (``runc_features`` of each host; an agent that does not report them is not judged.)"""
    findings = []
    if local and not local.get("checkpoint"):
        findings.append(_runc_lacks("source", local, "checkpoint support"))
    if remote and not remote.get("checkpoint"):
        findings.append(_runc_lacks("destination", remote, "checkpoint support"))
    for need in strategy.needs:
        features = local if need.side == "source" else remote
        if need.runc and features and not features.get(need.feature):
            findings.append(_runc_lacks(need.side, features,
                                        f"{need.what} ({strategy.strategy})"))
    return findings


def _runc_lacks(side: str, features: dict, what: str) -> Finding:
    return Finding("runc", "error", f"runc {features.get('version')} on the {side} "
                   f"({features.get('binary')}) lacks {what}")


def _version(text: str | None) -> tuple[int, ...] | None:
    """'4.2.1' -> (4, 2, 1); None for 'missing', 'unknown' or None."""
    parts = (text or "").split("-")[0].split(".")
    return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else None


# CPU
async def cpuinfo_dump(directory: Path) -> Path:
    """Source side: ``criu cpuinfo dump`` into ``directory``; returns the image path."""
    directory.mkdir(parents=True, exist_ok=True)
    rc, out = await run_criu("cpuinfo", "dump", "-D", str(directory))
    if rc != 0:
        raise GodwitError(f"criu cpuinfo dump failed: {_last_line(out)}")
    return directory / CPUINFO_IMAGE


async def cpuinfo_check(directory: Path) -> Finding:
    """Destination side: ``criu cpuinfo check`` of the source's image in ``directory``."""
    rc, out = await run_criu("cpuinfo", "check", "-D", str(directory))
    if rc == 0:
        return Finding("cpu", "ok", "the destination CPU can run the source's processes")
    return Finding("cpu", "error", f"CPU incompatible: {_last_line(out)}")


async def cpuinfo_image() -> bytes:
    """The local ``cpuinfo.img`` as bytes, to send to the destination."""
    with tempfile.TemporaryDirectory(prefix="godwit-cpuinfo-") as tmp:
        return (await cpuinfo_dump(Path(tmp))).read_bytes()


async def check_cpuinfo_image(image: bytes) -> Finding:
    """:func:`cpuinfo_check` of an image received as bytes."""
    with tempfile.TemporaryDirectory(prefix="godwit-cpuinfo-") as tmp:
        (Path(tmp) / CPUINFO_IMAGE).write_bytes(image)
        return await cpuinfo_check(Path(tmp))


def _last_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


# resources
def check_resources(dest_info: dict, needed_mem: int, needed_disk: int) -> list[Finding]:
    """Enough free memory and disk (bytes) on the destination, with 10 % headroom."""
    return [
        _resource("memory", dest_info.get("mem_available"), needed_mem),
        _resource("disk", dest_info.get("disk_free"), needed_disk),
    ]


def _resource(check: str, available: int | None, needed: int) -> Finding:
    if available is None:
        return Finding(check, "warn", f"destination did not report free {check}")
    text = f"{check}: need {_mib(needed)}, destination has {_mib(available)}"
    if available < needed:
        return Finding(check, "error", f"not enough {text}")
    if available < needed * (1 + HEADROOM):
        return Finding(check, "warn", f"little headroom for {text}")
    return Finding(check, "ok", text)


def check_file_locks(locks: int, shared_storage: bool) -> Finding:
    """With shared storage the restored copy would wait for ever for locks the frozen source
    copy still holds on the same files; a transferred rootfs has files of its own."""
    if not locks:
        return Finding("file locks", "ok", "none held")
    if shared_storage:
        return Finding("file locks", "error",
                       f"the container holds {locks} file lock(s): on shared storage the "
                       "destination cannot take them while the frozen source holds them; "
                       "migrate without --shared-storage")
    return Finding("file locks", "ok", f"{locks} held, carried to the destination")


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


# all checks of one migration
async def run_checks(source: HostInfo, destination: HostInfo, dest, *, strategy: Strategy,
                     needed_mem: int, needed_disk: int, max_skew_s: float,
                     incoming: IncomingRequest | None = None) -> list[Finding]:
    """Every pre-flight check between this (source) host and ``dest`` (an AgentClient);
    against a peer of another protocol only that one (its other answers may mislead).
    With the prepare request it would get (``incoming``), ``dest`` says whether its
    admission policy and free disk take it."""
    protocol = check_protocol(source.protocol, destination.protocol)
    if protocol.level == "error":
        return [protocol]
    source_info, dest_info = msgspec.to_builtins(source), msgspec.to_builtins(destination)
    skew, cpu, *admission = await asyncio.gather(  # the questions to the destination at once
        measure_skew(dest.time_pair), check_cpu_on(dest),
        *([dest.check_admission(incoming)] if incoming is not None else []))
    return [protocol, *compare_criu(source_info, dest_info, strategy),
            check_skew(skew, max_skew_s), *check_resources(dest_info, needed_mem, needed_disk),
            cpu, *admission]


async def check_cpu_on(dest) -> Finding:
    """Can ``dest`` (an AgentClient) run this host's processes: CRIU's cpuinfo check of
    this host's image, there."""
    return await dest.check_cpuinfo(await cpuinfo_image())


def refusal(findings: Iterable[Finding]) -> str:
    """One line naming every failed check."""
    return "; ".join(f"{f.check}: {f.message}" for f in findings if f.level == "error")
