"""The `memhog` fixture of the tests of CRIU alone: godwit.lab.memhog_process's memhog."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from godwit.lab.memhog_process import Memhog, start_memhog, verified_state

__all__ = ["Memhog", "memhog_fixture", "start_memhog", "verified_state"]


def memhog_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Memhog]:
    """Body of an indirect `memhog` fixture: request.param is the MiB to touch."""
    hog = start_memhog(tmp_path, request.param)
    yield hog
    hog.stop()
