"""CRIU's dump and restore without hardware breakpoints (scripts/criu-patches/0023), as
godwit asks for every container: a task leaving the parasite or the restorer is stopped by
stepping its system calls. With the CRIU godwit runs (GODWIT_CRIU or the installed one)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from memhog_process import Memhog, memhog_fixture, verified_state

from godwit.criu import CRIU, criu_base_options

pytestmark = pytest.mark.integration
STEPPED = "Force no-breakpoints restore of"  # compel, when it steps instead of a breakpoint


@pytest.fixture
def memhog(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Memhog]:
    yield from memhog_fixture(request, tmp_path)


def criu(action: str, config: Path, images: Path, *args: str) -> str:
    """Run `criu action` with godwit's options file; its log."""
    log = f"{action}.log"
    done = subprocess.run([CRIU, action, "--config", str(config), "-D", str(images),
                           "-v4", "-o", log, *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120, check=False)
    text = (images / log).read_text() if (images / log).exists() else done.stderr
    assert done.returncode == 0, f"criu {action} failed: {text[-2000:]}"
    return text


def test_godwit_asks_criu_for_no_breakpoints() -> None:
    assert "no-breakpoints" in criu_base_options()


@pytest.mark.parametrize("memhog", [16], indirect=True)
def test_dump_and_restore_step_the_tasks_out(tmp_path: Path, memhog: Memhog) -> None:
    """Without the patch CRIU refuses the option; with it, neither the dump's parasite nor
    the restorer is left at a breakpoint, and the memory comes back whole."""
    config, images, pidfile = tmp_path / "criu.conf", tmp_path / "images", tmp_path / "pid"
    config.write_text("\n".join(criu_base_options()) + "\n")
    images.mkdir()
    pid = memhog.proc.pid
    dump_log = criu("dump", config, images, "-t", str(pid))
    memhog.proc.wait(10)
    assert f"{STEPPED} {pid}" in dump_log
    restore_log = criu("restore", config, images, "-d", "--pidfile", str(pidfile))
    assert STEPPED in restore_log
    state = verified_state(memhog, int(pidfile.read_text()))
    assert " ok=1 " in state, f"restored memhog's memory differs: {state}"
