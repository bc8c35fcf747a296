"""The machine set-up: the CRIU that scripts/setup installs is the release it pins."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from godwit.runc import CURRENT_RUNC

SETUP = Path(__file__).resolve().parent.parent / "scripts" / "setup"


def pinned(variable: str) -> str:
    match = re.search(rf"^{variable}=(\S+)$", SETUP.read_text(), re.MULTILINE)
    assert match, f"{variable} is not pinned in scripts/setup"
    return match.group(1)


def test_pin_is_a_release_and_a_sha256() -> None:
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", pinned("criu_version"))
    assert re.fullmatch(r"[0-9a-f]{64}", pinned("criu_orig_sha256"))


@pytest.mark.integration
def test_installed_criu_is_the_pinned_release() -> None:
    out = subprocess.run(["criu", "--version"], capture_output=True, text=True, check=True)
    assert re.search(r"^Version: (\S+)", out.stdout, re.MULTILINE).group(1) == pinned(
        "criu_version"), out.stdout


@pytest.mark.integration
def test_current_runc_is_installed_beside_debians() -> None:
    """scripts/runc-current: runc 1.3 in its own directory, /usr/bin/runc still Debian's."""
    if not os.access(CURRENT_RUNC, os.X_OK):
        pytest.skip(f"no current runc at {CURRENT_RUNC}: scripts/runc-current could not build it")
    versions = {binary: subprocess.run([binary, "--version"], capture_output=True, text=True,
                                       check=True).stdout.split()[2]
                for binary in ("/usr/bin/runc", str(CURRENT_RUNC))}
    assert versions["/usr/bin/runc"].startswith("1.1."), versions
    assert versions[str(CURRENT_RUNC)].startswith("1.3."), versions
    again = subprocess.run([SETUP.parent / "runc-current"], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and versions[str(CURRENT_RUNC)] in again.stderr, again.stderr
