"""CRIU's zdtm static tests: built once from the CRIU source tarball, selected by `.desc`.

Shared by ``bench/zdtm.py`` (the full run) and ``tests/conformance/test_zdtm.py`` (a CI
subset). The selection follows CRIU's ``test/zdtm.py``: a test is an executable of
``zdtm/static`` (minus zdtm.desc's excludes); its ``<name>.desc`` is a Python literal
(``flavor``, ``opts``, ``dopts``, ``ropts``, ``flags``, ``feature``, ``arch``, ``deps``,
``timeout``); a ``<name>.checkskip`` script that exits non-zero skips it; its start command
is the ``<name>.pid`` rule of zdtm/static/Makefile (read with ``make -n``).
"""

from __future__ import annotations

import ast
import fcntl
import os
import platform
import re
import shlex
import shutil
import subprocess
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("GODWIT_CACHE", "/var/cache/godwit"))
TARBALLS = "criu_*.orig.tar.*"
BUILD_TIMEOUT_S = 900
CHECK_TIMEOUT_S = 30
DEFAULT_TEST_TIMEOUT_S = 30
# Flags that make a test special for zdtm.py's default run, or that godwit cannot honour.
SPECIAL_FLAGS = ("crfail", "noauto", "excl", "reqrst")
# CRIU options a test needs that a godwit migration cannot pass (runc drives CRIU).
CRIU_OPTION_KEYS = ("opts", "dopts", "ropts")
# zdtm.py's uid and groups for a test without the suid flag ("numbers match those in criu").
ZDTM_UID, ZDTM_GID, ZDTM_GROUPS = "18943", "58467", "27495 48244"


class ZdtmError(RuntimeError):
    """The suite cannot be built or read."""


@dataclass(frozen=True)
class ZdtmTest:
    """One selected static test and how zdtm.py starts it."""

    name: str
    argv: tuple[str, ...]  # relative to zdtm/static, e.g. ("./pipe00", "--pidfile=...")
    desc: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def flags(self) -> list[str]:
        return flags_of(self.desc)

    @property
    def timeout(self) -> int:
        return int(self.desc.get("timeout") or DEFAULT_TEST_TIMEOUT_S)

    @property
    def deps(self) -> list[str]:
        return list(self.desc.get("deps", []))

    def env(self, *, as_root: bool = False) -> dict[str, str]:
        """The environment zdtm.py gives the test (minus ZDTM_NEWNS: the container is its
        namespaces). ``as_root`` keeps a non-suid test root (no ZDTM_UID/GID/GROUPS)."""
        env = {"TMPDIR": "/tmp", "ZDTM_THREAD_BOMB": "5",
               "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        if "suid" not in self.flags and not as_root:
            env.update(ZDTM_UID=ZDTM_UID, ZDTM_GID=ZDTM_GID, ZDTM_GROUPS=ZDTM_GROUPS)
        return env


@dataclass
class Selection:
    """Selected tests and, for every other static test, why it was left out."""

    tests: list[ZdtmTest]
    skipped: dict[str, str]


def flags_of(desc: dict[str, Any]) -> list[str]:
    return str(desc.get("flags", "")).split()


# ------------------------------------------------------------------------ build


def tarball(cache: Path = CACHE) -> Path:
    """The CRIU source tarball scripts/setup fetched."""
    found = sorted((cache / "src").glob(TARBALLS))
    if not found:
        raise ZdtmError(f"no CRIU source tarball in {cache / 'src'}: run scripts/setup first")
    return found[-1]


def version_of(path: Path) -> str:
    match = re.match(r"criu_(.+)\.orig\.tar", path.name)
    if not match:
        raise ZdtmError(f"cannot read a CRIU version from {path.name}")
    return match.group(1)


def build(cache: Path = CACHE, log: Path | None = None) -> Path:
    """CRIU's test/ dir with zdtm/lib and zdtm/static built; reused when already built."""
    source = tarball(cache)
    root = cache / f"zdtm-{version_of(source)}"
    test_dir = root / "test"
    marker = root / ".built"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(cache / f".zdtm-{version_of(source)}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once build once
        if not marker.exists():
            _extract(source, root)
            _make(test_dir, log or root / "build.log")
            marker.write_text(source.name + "\n")
    return test_dir


def _extract(source: Path, root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    with tarfile.open(source) as tar:
        tar.extractall(staging, filter="tar")
    tops = [p for p in staging.iterdir() if p.is_dir()]
    if len(tops) != 1:
        raise ZdtmError(f"unexpected layout of {source.name}")
    tops[0].rename(root)
    staging.rmdir()


def _make(test_dir: Path, log: Path) -> None:
    jobs = str(os.cpu_count() or 1)
    with open(log, "w") as out:
        for sub in ("zdtm/lib", "zdtm/static"):
            done = subprocess.run(["make", "-j", jobs, "-C", sub], cwd=test_dir, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S)
            if done.returncode != 0:
                raise ZdtmError(f"make -C {sub} failed (log: {log})")


# ------------------------------------------------------------------------ selection


def read_desc(test_dir: Path, name: str) -> dict[str, Any] | None:
    """A test's .desc (a Python literal), {} when there is none or it is empty, None when
    it is code (zdtm.py evaluates it; mnt_ext_dev's is noauto unless ZDTM_MNT_EXT_DEV)."""
    path = test_dir / "zdtm" / "static" / f"{name}.desc"
    if not path.exists() or path.stat().st_size == 0:
        return {}
    try:
        desc = ast.literal_eval(path.read_text())
    except (ValueError, SyntaxError):
        return None
    if not isinstance(desc, dict):
        raise ZdtmError(f"{path}: not a dict")
    return desc


def static_tests(test_dir: Path) -> list[str]:
    """Names of the static tests, as zdtm.py's all_tests finds them."""
    top = ast.literal_eval((test_dir / "zdtm.desc").read_text())
    excluded = {Path(e).name for e in top.get("exclude", []) if e.startswith("static/")}
    static = test_dir / "zdtm" / "static"
    names = []
    for path in static.iterdir():
        st = path.lstat()
        if not path.is_file() or path.is_symlink() or not st.st_mode & 0o100:
            continue
        if path.suffix in (".checkskip", ".hook") or path.name in excluded:
            continue
        names.append(path.name)
    return sorted(names)


class FeatureProbe:
    """``criu check --feature X``, asked once per feature."""

    def __init__(self) -> None:
        self.known: dict[str, bool] = {}

    def __call__(self, feature: str) -> bool:
        if feature not in self.known:
            argv = ["criu", "check", "--no-default-config", "-v0", "--feature", feature]
            done = subprocess.run(argv, capture_output=True, timeout=CHECK_TIMEOUT_S)
            self.known[feature] = done.returncode == 0
        return self.known[feature]


def skip_reason(test_dir: Path, name: str, desc: dict[str, Any], flavor: str,
                has_feature: FeatureProbe) -> str | None:
    """Why zdtm.py (default run, FLAVOR only) would not run this test; None: it would."""
    static = test_dir / "zdtm" / "static"
    flags = flags_of(desc)
    if desc.get("arch", platform.machine()) != platform.machine():
        return f"arch {desc['arch']}"
    if flavor not in str(desc.get("flavor", "h ns uns")).split():
        return f"flavor {desc.get('flavor')}"
    if special := [f for f in SPECIAL_FLAGS if f in flags]:
        return "flag " + " ".join(special)
    if options := [k for k in CRIU_OPTION_KEYS if str(desc.get(k, "")).strip()]:
        return "CRIU options " + " ".join(f"{k}={desc[k]!r}" for k in options)
    if (static / f"{name}.hook").exists():
        return "needs a zdtm.py hook"
    if missing := [f for f in str(desc.get("feature", "")).split() if not has_feature(f)]:
        return "no CRIU feature " + " ".join(missing)
    checkskip = static / f"{name}.checkskip"
    if os.access(checkskip, os.X_OK):
        done = subprocess.run([f"zdtm/static/{name}.checkskip"], cwd=test_dir,
                              capture_output=True, timeout=CHECK_TIMEOUT_S)
        if done.returncode != 0:
            return "checkskip failed"
    return None


def start_commands(test_dir: Path, names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """The command of each test's ``<name>.pid`` make rule (``make -n``), e.g.
    ``./pipe00 --pidfile=pipe00.pid --outfile=pipe00.out``."""
    names = list(names)
    if not names:
        return {}
    done = subprocess.run(["make", "-n", "--no-print-directory", "-C", "zdtm/static",
                           *(f"{n}.pid" for n in names)], cwd=test_dir, capture_output=True,
                          text=True, timeout=BUILD_TIMEOUT_S)
    if done.returncode != 0:
        raise ZdtmError(f"make -n of the tests' .pid rules failed: {done.stderr.strip()[-300:]}")
    commands = {}
    for line in done.stdout.splitlines():
        argv = shlex.split(line)
        if argv and argv[0].startswith("./") and argv[0][2:] in names:
            commands[argv[0][2:]] = tuple(argv)
    if missing := [n for n in names if n not in commands]:
        raise ZdtmError(f"no start command for {', '.join(missing)}")
    return commands


def select(test_dir: Path, flavor: str = "ns", only: str | None = None) -> Selection:
    """The static tests zdtm.py would run in FLAVOR that godwit can carry (no CRIU option,
    no hook); ``only`` a regular expression on names."""
    probe = FeatureProbe()
    chosen: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name in static_tests(test_dir):
        if only and not re.search(only, name):
            continue
        desc = read_desc(test_dir, name)
        if desc is None:
            skipped[name] = "its .desc is code, not a literal"
            continue
        reason = skip_reason(test_dir, name, desc, flavor, probe)
        if reason:
            skipped[name] = reason
        else:
            chosen[name] = desc
    commands = start_commands(test_dir, chosen)
    tests = [ZdtmTest(name, commands[name], desc) for name, desc in chosen.items()]
    return Selection(tests, skipped)


def load_tests(test_dir: Path, names: Iterable[str]) -> list[ZdtmTest]:
    """The named static tests, whatever the selection would say of them (a fixed subset)."""
    names = list(names)
    static = test_dir / "zdtm" / "static"
    if missing := [n for n in names if not (static / n).is_file()]:
        raise ZdtmError(f"no such zdtm static test: {', '.join(missing)}")
    commands = start_commands(test_dir, names)
    return [ZdtmTest(n, commands[n], read_desc(test_dir, n) or {}) for n in names]
