"""The root cause of a failure, read from real CRIU logs (tests/data/criu-logs)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from godwit import criu, procfs
from godwit.criu import log_error, root_cause
from godwit.errors import GodwitError
from godwit.migration.receiver import _reap_if_dead, restore_failure
from godwit.tls import TLSFiles

LOGS = Path(__file__).with_name("data") / "criu-logs"
RLIMIT_LINE = ("(00.048338) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for "
               "self: Operation not permitted\n")


def read(name: str) -> str:
    return (LOGS / name).read_text()


@pytest.mark.parametrize(("log", "cause"), [
    ("dump-unsupported-fd.log", "Can't dump file 3 of that type [20666] (chr 10:229)"),
    ("dump-nonroot-rlimit.log", "Can't get rlimit 0: Operation not permitted"),
    ("restore-missing-file.log",
     "Can't open file etc/hostname on restore: No such file or directory"),
    ("restore-child-missing-file.log",
     "Can't open file etc/passwd on restore: No such file or directory"),
    ("restore-interleaved-bind.log",
     "inet: Can't bind inet socket (id 6): Cannot assign requested address"),
])
def test_root_cause_is_the_failure_not_the_first_error(log: str, cause: str) -> None:
    text = read(log)
    assert "RLIMIT_NOFILE for self" in text.split("Error (", 2)[1], "the log's first error"
    assert root_cause(text) == cause


def test_an_unknown_early_error_is_not_taken_for_the_chain(monkeypatch) -> None:
    """Without the non-fatal list, the start-up error is still left out: hundreds of lines
    of work follow it before the failure chain."""
    monkeypatch.setattr(criu, "NON_FATAL_ERRORS", ())
    assert root_cause(read("dump-unsupported-fd.log")) == \
        "Can't dump file 3 of that type [20666] (chr 10:229)"


def test_errors_after_the_summary_are_cleanup_noise() -> None:
    text = read("restore-missing-file.log")
    assert text.rstrip().endswith("cgroupd: recv req error: No such file or directory")
    assert "cgroupd" not in (root_cause(text) or "")


def test_a_lone_summary_or_no_error() -> None:
    summary_only = RLIMIT_LINE + "(00.1) Something\n(00.2) Error (criu/cr-dump.c:1975): " \
        "Dumping FAILED.\n"
    assert root_cause(summary_only) == "Dumping FAILED."
    assert root_cause(RLIMIT_LINE + "(00.1) Dumping finished successfully\n") is None
    assert root_cause("") is None


def test_log_error_reads_the_work_dir(tmp_path: Path) -> None:
    assert log_error(tmp_path, "dump.log") is None
    (tmp_path / "dump.log").write_text(read("dump-nonroot-rlimit.log"))
    assert log_error(tmp_path, "dump.log") == "Can't get rlimit 0: Operation not permitted"


def test_tls_options_as_arguments_and_as_config_lines(tmp_path: Path) -> None:
    files = TLSFiles(tmp_path / "ca.crt", tmp_path / "a.crt", tmp_path / "a.key",
                     tmp_path / "crl.pem")
    assert criu.tls_argv(None) == criu.tls_config_lines(None) == []
    assert criu.tls_config_lines(files) == [
        "tls", f"tls-cacert {files.ca}", f"tls-cert {files.cert}", f"tls-key {files.key}",
        f"tls-cacrl {files.crl}"]
    server = criu.tls_argv(files, check_peer_name=False)
    assert server[-1] == "--tls-no-cn-verify" and "--tls-no-cn-verify" not in criu.tls_argv(files)


LAZY_ECHO = ("(00.010000) uffd: Error (criu/uffd.c:763): recv_fd error\n"
             "(00.010100) Error (criu/uffd.c:1500): Lazy pages transfer FAILED.\n")
LAZY_OWN = "(00.010000) Error (criu/uffd.c:600): uffd: Can't read pagemap: Bad file\n"


@pytest.mark.parametrize(("restore_log", "lazy_log", "expected"), [
    ("restore-interleaved-bind.log", LAZY_ECHO,  # the daemon only saw the restore die
     "inet: Can't bind inet socket (id 6): Cannot assign requested address"),
    (None, LAZY_OWN, "runc restore failed (criu lazy-pages: uffd: Can't read pagemap: Bad file)"),
])
def test_restore_failure_names_the_daemon_only_as_a_cause(tmp_path: Path, restore_log: str | None,
                                                          lazy_log: str, expected: str) -> None:
    if restore_log:
        (tmp_path / "restore.log").write_text(read(restore_log))
    (tmp_path / criu.LAZY_LOG).write_text(lazy_log)
    ended = SimpleNamespace(returncode=1)
    assert restore_failure(tmp_path, GodwitError("runc restore failed"), ended) == expected


def test_restore_failure_names_a_daemon_dead_but_not_yet_reaped(tmp_path: Path) -> None:
    """The restored copy exits because its lazy-pages daemon was killed: the report names
    the daemon's end even when asyncio has not collected it yet."""
    async def report() -> tuple[int | None, str]:
        daemon = await asyncio.create_subprocess_exec("sleep", "60")
        os.kill(daemon.pid, signal.SIGKILL)
        while procfs.alive(daemon.pid):
            time.sleep(0.001)  # no await: the loop must not reap it before the report
        unreaped = daemon.returncode
        await _reap_if_dead(daemon)
        exited = GodwitError("the container exited right after its restore")
        return unreaped, restore_failure(tmp_path, exited, daemon)
    unreaped, detail = asyncio.run(report())
    assert unreaped is None, "reaped before the report: the case is not exercised"
    assert detail.endswith("(criu lazy-pages: exit -9)"), detail


def test_restore_failure_does_not_name_a_daemon_that_succeeded(tmp_path: Path) -> None:
    done = SimpleNamespace(returncode=0)
    assert restore_failure(tmp_path, GodwitError("it exited"), done) == "it exited"
