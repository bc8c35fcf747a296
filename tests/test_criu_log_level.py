"""The log level of a runc-driven CRIU comes from godwit's CRIU configuration file
(scripts/criu-patches/0025): runc asks for debug logging in every request, and CRIU
took the request's level whatever the file said."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import _require_runtime
from memhog_container import running_in_runc

from godwit.criu import LOG_LEVEL, criu_base_options, set_log_level
from godwit.lab.workloads import memhog_bundle
from godwit.runc import CheckpointOptions, Runc

pytestmark = pytest.mark.integration
NAME = "quiet"
INFO_LINE = "Dumping finished successfully"  # pr_info, level 3
DEBUG_LINE = "Handling VMA with the following smaps entry"  # pr_debug, level 4


@pytest.fixture
def container(tmp_path: Path) -> Iterator[Runc]:
    """A memhog container whose CRIU configuration file holds godwit's options."""
    _require_runtime()
    bundle = memhog_bundle(tmp_path / "bundle", 8)
    config_file = tmp_path / "criu.conf"
    config_file.write_text("\n".join(criu_base_options()) + "\n")
    spec = json.loads((bundle / "config.json").read_text())
    spec.setdefault("annotations", {})["org.criu.config"] = str(config_file)
    (bundle / "config.json").write_text(json.dumps(spec))
    runc = Runc(tmp_path / "runc")
    with running_in_runc(runc, NAME, bundle):
        yield runc


def test_godwit_asks_for_info_level() -> None:
    assert LOG_LEVEL == 3 and f"verbosity={LOG_LEVEL}" in criu_base_options()


def test_an_agent_can_ask_for_debug_logs() -> None:
    """`godwit agent --criu-log-level debug`, to look into a container that fails."""
    try:
        set_log_level("debug")
        assert "verbosity=4" in criu_base_options()
    finally:
        set_log_level("info")
    assert "verbosity=3" in criu_base_options()


def test_a_bad_level_is_one_line() -> None:
    done = subprocess.run([sys.executable, "-m", "godwit", "agent", "--criu-log-level", "loud"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "--criu-log-level" in done.stderr and "Traceback" not in done.stderr


def test_runc_checkpoint_logs_at_the_configuration_files_level(container: Runc,
                                                               tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    opts = CheckpointOptions(image_path=images, work_path=tmp_path / "work",
                             leave_running=True)
    asyncio.run(container.checkpoint(NAME, opts))
    log = (opts.work_path / "dump.log").read_text()
    assert INFO_LINE in log, log[-1000:]
    assert DEBUG_LINE not in log, "CRIU logged at runc's debug level, not the file's"
