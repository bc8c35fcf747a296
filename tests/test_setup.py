"""The machine set-up: the CRIU that scripts/setup installs is the release it pins."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

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
