"""runc checkpoint/restore held before CRIU (godwit.criu_gate), with the real runc and CRIU."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for
from memhog_container import running_in_runc

from godwit import criu_gate
from godwit.lab.workloads import memhog_bundle, read_state
from godwit.runc import CheckpointOptions, Runc, RuncError

NAME = "gated"
STDIO = ["/dev/null", "/dev/null", "/dev/null"]


def test_request_type_is_peeked_not_taken() -> None:
    ours, shims = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, shims:
        ours.send(bytes([0x08, 0x02, 0x12, 0x00]))  # criu_req{type: RESTORE, opts: {}}
        assert criu_gate.request_type(shims.fileno()) == 2
        assert shims.recv(16) == bytes([0x08, 0x02, 0x12, 0x00])


def test_real_criu_gets_the_path_without_the_shim() -> None:
    assert criu_gate.path_without("/w/criu-gate", "/w/criu-gate:/usr/bin:/bin") == "/usr/bin:/bin"


def _field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, int):
        return criu_gate._encode(0, criu_gate._encode_varint(number << 3), value)
    return criu_gate._encode(2, criu_gate._encode_varint(number << 3 | 2), value)


def _request(*opts: bytes) -> bytes:
    return _field(1, 1) + _field(2, b"".join(opts))  # criu_req{type: DUMP, opts: {...}}


def test_netns_of_the_container_is_no_longer_left_out(monkeypatch) -> None:
    """runc's empty_ns loses CLONE_NEWNET (other bits stay) and the fds CRIU resolves
    through its peer become the gate's own."""
    monkeypatch.setattr(criu_gate, "_own_copy_of_runc_fd", lambda fd: fd + 100)
    uts = 0x04000000
    request = _request(_field(1, 7), _field(17, 8), _field(37, b"mnt[/x]:/x"),
                       _field(38, criu_gate.CLONE_NEWNET | uts), _field(49, 300))
    rewritten = criu_gate.carrying_netns(request)
    assert rewritten == _request(_field(1, 107), _field(17, 108), _field(37, b"mnt[/x]:/x"),
                                 _field(38, uts), _field(49, 400))
    only_net = _request(_field(1, 7), _field(38, criu_gate.CLONE_NEWNET))
    assert criu_gate.carrying_netns(only_net) == _request(_field(1, 107))


def test_external_netns_and_requests_without_empty_ns_are_left_alone() -> None:
    external = _request(_field(1, 7), _field(37, b"net[4026532000]:extRootNetNS"),
                        _field(38, criu_gate.CLONE_NEWNET))
    assert criu_gate.carrying_netns(external) is None
    assert criu_gate.carrying_netns(_request(_field(1, 7), _field(5, 1))) is None


@pytest.fixture
def running(tmp_path: Path, runc_binary: str) -> Iterator[tuple[Runc, Path]]:
    """A memhog container under a private runc root, for each runc; (runc, its rootfs)."""
    runc = Runc(tmp_path / "runc", binary=runc_binary)
    with running_in_runc(runc, NAME, memhog_bundle(tmp_path / "bundle", 8)) as rootfs:
        yield runc, rootfs


def dump_options(tmp_path: Path) -> CheckpointOptions:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    return CheckpointOptions(image_path=images, work_path=tmp_path / "work",
                             leave_running=True, tcp_established=True)


def status(runc: Runc) -> str:
    return asyncio.run(runc.state(NAME)).status


def test_called_off_dump_leaves_the_container_running(running, tmp_path: Path) -> None:
    runc, rootfs = running
    opts = dump_options(tmp_path)

    async def hold_then_call_off() -> None:
        held = await runc.hold_checkpoint(NAME, opts)
        await held.call_off()

    asyncio.run(hold_then_call_off())
    assert status(runc) == "running"
    assert [p.name for p in opts.image_path.iterdir()] == ["descriptors.json"], \
        "runc got to CRIU's gate, CRIU itself never ran"
    counter = read_state(rootfs)["counter"]
    wait_for(lambda: read_state(rootfs)["counter"] > counter, what="memhog still counting")


def test_held_dump_runs_only_when_let_through(running, tmp_path: Path) -> None:
    runc, _rootfs = running
    opts = dump_options(tmp_path)

    async def hold_pause_proceed() -> list[str]:
        held = await runc.hold_checkpoint(NAME, opts)
        await asyncio.sleep(0.3)
        before = sorted(p.name for p in opts.image_path.iterdir())
        await runc.pause(NAME)
        await held.proceed()
        return before

    before = asyncio.run(hold_pause_proceed())
    assert before == ["descriptors.json"]
    assert (opts.image_path / "inventory.img").exists()
    assert status(runc) == "paused", "--leave-running keeps the paused copy"


def test_called_off_restore_leaves_no_container(running, tmp_path: Path) -> None:
    runc, rootfs = running
    images, work = tmp_path / "restore-images", tmp_path / "restore-work"
    images.mkdir()
    (images / "descriptors.json").write_text(json.dumps(STDIO))
    other = Runc(tmp_path / "runc-b", binary=runc.binary)
    bundle = rootfs.parent

    async def hold_then_call_off() -> None:
        held = await other.hold_restore("copy", bundle, images, work, lazy_pages=True)
        assert [s.name for s in await other.list()] == [], "held: not a container yet"
        await held.call_off()

    asyncio.run(hold_then_call_off())
    assert asyncio.run(other.list()) == []
    assert not (work / "restore.log").exists(), "CRIU never started"


def test_runc_failing_before_the_gate_reports_its_own_error(tmp_path: Path,
                                                            runc_binary: str) -> None:
    runc = Runc(tmp_path / "runc", binary=runc_binary)
    with pytest.raises(RuncError, match="not exist"):
        asyncio.run(runc.hold_checkpoint("nosuch", dump_options(tmp_path)))
