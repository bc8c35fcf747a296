"""Pre-flight checks (godwit.preflight): clock math, compatibility rules, resources, CPU."""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import time
from pathlib import Path

import pytest

from godwit import preflight
from godwit.errors import GodwitError
from godwit.migration.strategies import strategy_class
from godwit.preflight import Finding, SkewResult, check_skew, offset_from_samples, verdict

needs_criu = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("criu"),
                                reason="needs root and criu")


def sample(t1: float, offset: float, there: float, back: float, work: float = 0.001):
    """(t1, t2, t3, t4) for a server ``offset`` s ahead and one-way delays there/back."""
    t2 = t1 + there + offset
    t3 = t2 + work
    return t1, t2, t3, t3 - offset + back


def test_offset_with_symmetric_delays_is_exact() -> None:
    offset, delay = offset_from_samples([sample(1000.0, 0.25, 0.02, 0.02)])
    assert offset == pytest.approx(0.25)
    assert delay == pytest.approx(0.04)


def test_asymmetric_delay_errs_by_half_the_difference() -> None:
    offset, delay = offset_from_samples([sample(1000.0, -3.0, 0.010, 0.030)])
    assert offset == pytest.approx(-3.0 + (0.010 - 0.030) / 2)
    assert abs(offset - -3.0) <= delay / 2


def test_the_sample_with_least_delay_wins() -> None:
    samples = [sample(1000.0 + i, 0.1, there, back)
               for i, (there, back) in enumerate([(0.2, 0.01), (0.002, 0.002), (0.05, 0.3)])]
    offset, delay = offset_from_samples(samples)
    assert offset == pytest.approx(0.1)
    assert delay == pytest.approx(0.004)
    with pytest.raises(ValueError):
        offset_from_samples([])


def test_measure_skew_against_a_server_ahead_by_two_seconds() -> None:
    async def server_times() -> tuple[float, float]:
        await asyncio.sleep(0.002)  # request on the wire
        received = time.time() + 2.0
        return received, time.time() + 2.0

    result = asyncio.run(preflight.measure_skew(server_times, samples=5))
    assert result.samples == 5
    assert result.offset_s == pytest.approx(2.0, abs=0.005)
    assert 0 <= result.delay_s < 0.05


@pytest.mark.parametrize(("offset", "limit", "level"), [
    (0.004, 0.5, "ok"), (-0.009, 0.5, "ok"), (0.05, 0.5, "warn"), (-0.4, 0.5, "warn"),
    (0.6, 0.5, "error"), (-0.6, 0.5, "error"), (0.6, 2.0, "warn"), (0.06, 0.05, "error"),
])
def test_skew_thresholds(offset: float, limit: float, level: str) -> None:
    finding = check_skew(SkewResult(offset, 0.002, 8), limit_s=limit)
    assert finding.level == level
    assert ("ahead of" if offset > 0 else "behind") in finding.message


def info(criu: str = "4.2.1", runc: str = "1.1.5", lazy: bool = True, dirty: bool = True,
         **extra: object) -> dict:
    caps = {"version": criu, "check_ok": True, "check_message": "Looks good.",
            "lazy_pages": lazy, "soft_dirty": dirty}
    return {"criu": caps, "runc": runc, **extra}


def compare(source: dict, dest: dict, strategy: str = "stop-and-copy") -> list[Finding]:
    """Pre-flight's CRIU and runc checks for the strategy of this name (the registry's)."""
    return preflight.compare_criu(source, dest, strategy_class(strategy))


def levels(findings: list[Finding]) -> dict[str, str]:
    return {f.check: f.level for f in findings}


def test_matching_hosts_pass() -> None:
    findings = compare(info(), info(), strategy="post-copy")
    assert levels(findings) == {"criu": "ok", "runc": "ok"}
    assert verdict(findings)


@pytest.mark.parametrize(("source", "dest", "strategy", "check", "level"), [
    (info("4.2.1"), info("3.19"), "stop-and-copy", "criu", "error"),
    (info("4.2.1"), info("missing"), "stop-and-copy", "criu", "error"),
    ({}, info(), "stop-and-copy", "criu", "error"),
    (info("4.2.1"), info("4.1"), "stop-and-copy", "criu", "warn"),
    (info(), info(lazy=False), "post-copy", "lazy-pages", "error"),
    (info(dirty=False), info(), "pre-copy", "soft-dirty", "error"),
    (info(runc="1.1.5"), info(runc="1.2.0"), "stop-and-copy", "runc", "warn"),
])
def test_compatibility_rules(source: dict, dest: dict, strategy: str, check: str,
                             level: str) -> None:
    findings = compare(source, dest, strategy=strategy)
    assert levels(findings)[check] == level
    assert verdict(findings) == (level != "error")


def test_lazy_pages_only_matter_for_post_copy() -> None:
    assert verdict(compare(info(), info(lazy=False)))
    dest = info()
    dest["criu"]["check_ok"] = False
    assert levels(compare(info(), dest))["criu"] == "warn"


@pytest.mark.parametrize(("mem", "disk", "expected"), [
    (8 << 30, 8 << 30, {"memory": "ok", "disk": "ok"}),
    (1050 << 20, 8 << 30, {"memory": "warn", "disk": "ok"}),
    (512 << 20, 8 << 30, {"memory": "error", "disk": "ok"}),
    (8 << 30, 100 << 20, {"memory": "ok", "disk": "error"}),
    (None, 8 << 30, {"memory": "warn", "disk": "ok"}),
])
def test_resources(mem: int | None, disk: int, expected: dict) -> None:
    dest = {"disk_free": disk} | ({} if mem is None else {"mem_available": mem})
    findings = preflight.check_resources(dest, needed_mem=1 << 30, needed_disk=2 << 30)
    assert levels(findings) == expected
    assert verdict(findings) == ("error" not in expected.values())


def test_verdict() -> None:
    assert verdict([])
    assert verdict([Finding("a", "ok", ""), Finding("b", "warn", "")])
    assert not verdict([Finding("a", "ok", ""), Finding("b", "error", "")])


def with_all_xfeatures(image: Path) -> None:
    """Claim every xsave feature in a cpuinfo image (protobuf: last field 8 wins)."""
    data = image.read_bytes()
    (size,) = struct.unpack("<I", data[8:12])
    body = data[12:12 + size]
    length, start = _varint_at(body, 1)
    entry = body[start:start + length] + b"\x40" + _varint(0xFFFFFFFF)  # xfeatures_mask
    body = b"\x0a" + _varint(len(entry)) + entry  # cpuinfo_entry.x86_entry
    image.write_bytes(data[:8] + struct.pack("<I", len(body)) + body + data[12 + size:])


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes([*out, n])


def _varint_at(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while data[pos] & 0x80:
        value |= (data[pos] & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
    return value | data[pos] << shift, pos + 1


@pytest.mark.integration
@needs_criu
def test_cpuinfo_round_trip(tmp_path: Path) -> None:
    image = asyncio.run(preflight.cpuinfo_dump(tmp_path / "src"))
    assert image.name == "cpuinfo.img" and image.stat().st_size > 0
    assert asyncio.run(preflight.cpuinfo_check(image.parent)).level == "ok"
    assert asyncio.run(preflight.check_cpuinfo_image(image.read_bytes())).level == "ok"
    fresh = asyncio.run(preflight.cpuinfo_image())
    assert asyncio.run(preflight.check_cpuinfo_image(fresh)).level == "ok"

    with_all_xfeatures(image)  # an image from a CPU with features this one lacks
    refused = asyncio.run(preflight.cpuinfo_check(image.parent))
    assert refused.level == "error" and "xfeatures" in refused.message
    (tmp_path / "empty").mkdir()
    assert asyncio.run(preflight.cpuinfo_check(tmp_path / "empty")).level == "error"


def test_cpuinfo_dump_failure_is_an_operator_error(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    async def failing(*args: str) -> tuple[int, str]:
        return 1, "Error (criu/cr-service.c): boom\n"

    monkeypatch.setattr(preflight, "run_criu", failing)
    with pytest.raises(GodwitError, match="boom"):
        asyncio.run(preflight.cpuinfo_dump(tmp_path))


def runc_features(version: str = "1.3.6+ds1", **lacking: bool) -> dict:
    features = {"binary": "/x/runc", "version": version, "checkpoint": True,
                "lazy_dump": True, "lazy_restore": True, "pre_dump": True}
    return {**features, **lacking}


@pytest.mark.parametrize(("source", "dest", "strategy", "refused"), [
    (runc_features(), runc_features(), "post-copy", None),
    (runc_features(lazy_dump=False), runc_features(), "post-copy", "on the source"),
    (runc_features(lazy_dump=False), runc_features(), "stop-and-copy", None),
    (runc_features(), runc_features(lazy_restore=False), "post-copy", "on the destination"),
    (runc_features(pre_dump=False), runc_features(), "pre-copy", "--pre-dump"),
    (runc_features(), runc_features(checkpoint=False), "stop-and-copy", "checkpoint support"),
    (None, None, "post-copy", None),  # an agent that does not report them is not judged
])
def test_runc_must_do_what_the_strategy_needs(source: dict | None, dest: dict | None,
                                              strategy: str, refused: str | None) -> None:
    findings = compare(info(runc_features=source), info(runc_features=dest),
                                      strategy=strategy)
    assert verdict(findings) == (refused is None)
    if refused:
        assert refused in preflight.refusal(findings)
        assert len(preflight.refusal(findings).splitlines()) == 1


@pytest.mark.parametrize(("source", "dest", "level"), [
    ("1.1.5+ds1", "1.1.5+ds1", "ok"),
    ("1.1.5+ds1", "1.1.12", "ok"),  # same release series
    ("1.1.5+ds1", "1.3.6+ds1", "warn"),
    ("1.3.6+ds1", "missing", "warn"),
])
def test_another_runc_release_is_a_warning(source: str, dest: str, level: str) -> None:
    findings = compare(info(runc=source), info(runc=dest))
    assert levels(findings)["runc"] == level
    assert verdict(findings)
