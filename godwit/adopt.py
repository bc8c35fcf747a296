"""Adopting a running runc container godwit did not start, and giving it back.

`adopt` checks, before touching anything, that CRIU can move the container as godwit
moves its own (running, no terminal, a rootfs directory, stdio that is /dev/null or a
pipe, its own network namespace with no device linked outside it), then takes it over
without restarting it:

* it keeps the netns runc made: CRIU dumps and restores it with what the container
  configured inside (addresses, routes, devices wholly inside; see godwit.criu_gate), as
  for a container godwit started without an address;
* its runc state gets godwit's CRIU configuration (the `org.criu.config` label);
* runc's state directory `<runc root>/<id>` moves into the agent's runc root, where the
  migration code finds every container it drives;
* godwit writes a record (the rootfs stays the operator's) and a bundle for destinations.

`release` undoes it on whichever host the container runs: the state directory goes to a
plain runc root, the state forgets godwit's CRIU configuration (and a netns path of
godwit's), and the record and bundle move to `<state>/released/` (the bundle runc's
state names).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from godwit import procfs
from godwit.bundle import load_config
from godwit.containers import ContainerRecord, ContainerStore, check_name
from godwit.errors import Conflict, GodwitError, NotFound
from godwit.fsio import atomic_write
from godwit.netns_carry import outside_link_refusal
from godwit.network import NETNS_DIR
from godwit.protocol import AdoptRequest, Released
from godwit.runc import ContainerState, Runc

DEFAULT_RUNC_ROOT = Path("/run/runc")
CRIU_CONFIG_LABEL = "org.criu.config"
STDIO_NAMES = ("stdin", "stdout", "stderr")


@dataclass(frozen=True)
class Foreign:
    """Where a container lives outside godwit: a runc root and the id runc knows it by."""

    root: Path
    id: str

    @classmethod
    def of(cls, request: AdoptRequest, name: str) -> Foreign:
        root = Path(request.runc_root or DEFAULT_RUNC_ROOT)
        if not root.is_absolute():
            raise GodwitError(f"runc root {root} is not an absolute path")
        return cls(root, check_name(request.id or name))

    @property
    def state_dir(self) -> Path:
        return self.root / self.id


# checks, before anything is touched
def check_running(state: ContainerState, where: Foreign) -> None:
    if state.status != "running":
        raise GodwitError(f"{where.id} under {where.root} is {state.status}, not running")


def check_config(config: dict, bundle: Path) -> Path:
    """Refuse a terminal or a rootfs that is not a directory; return the rootfs."""
    if config.get("process", {}).get("terminal"):
        raise GodwitError("it has a terminal (process.terminal: true): CRIU cannot move "
                          "a console that runc's caller holds")
    root = config.get("root", {}).get("path")
    rootfs = (bundle / root).resolve() if root else None
    if not rootfs or not rootfs.is_dir():
        raise GodwitError(f"its rootfs {rootfs} is not a directory")
    return rootfs


def check_netns_kind(namespaces: list[dict]) -> None:
    """Only a network namespace runc made for the container can move with it."""
    net = next((ns for ns in namespaces if ns.get("type") == "NEWNET"), None)
    if net is None:
        raise GodwitError("it shares the host's network namespace: its sockets cannot "
                          "move to another host")
    if net.get("path"):
        raise GodwitError(f"it joined the network namespace {net['path']}, which is not "
                          "its own")


def check_stdio(targets: list[str]) -> None:
    """stdio must be /dev/null or a pipe: CRIU cannot carry a host file or a terminal."""
    for fd, target in zip(STDIO_NAMES, targets, strict=False):
        if target != "/dev/null" and not target.startswith("pipe:"):
            raise GodwitError(f"its {fd} is {target}: CRIU cannot move a host file, "
                              "terminal or socket (start it with /dev/null or a pipe)")


def check_netns(pid: int) -> None:
    """Refuse a netns CRIU cannot carry (`pid`: the container's init)."""
    if reason := outside_link_refusal([pid, *procfs.descendants(pid)]):
        raise GodwitError(reason)


def freezer_cgroup(pid: int) -> str:
    """The cgroup godwit freezes: v1's freezer hierarchy, else the v2 one."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    paths = {line.split(":")[1]: line.split(":", 2)[2] for line in lines}
    return paths.get("freezer") or paths.get("", "/")


def stdio_targets(pid: int) -> list[str]:
    return [str(Path(f"/proc/{pid}/fd/{fd}").readlink()) for fd in range(3)]


# runc's state.json
def read_state(state_dir: Path) -> dict:
    try:
        return json.loads((state_dir / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise GodwitError(f"cannot read runc's state of it: {exc}") from exc


def with_godwit(state: dict, criu_config: Path) -> dict:
    """runc's state with godwit's CRIU configuration."""
    config = state["config"]
    labels = [la for la in config.get("labels") or []
              if not la.startswith(f"{CRIU_CONFIG_LABEL}=")]
    config["labels"] = [*labels, f"{CRIU_CONFIG_LABEL}={criu_config}"]
    return state


def without_godwit(state: dict, netns: Path, moved: tuple[Path, Path]) -> dict:
    """runc's state as plain runc keeps it: its own netns, no godwit CRIU config, and the
    bundle (and a godwit-owned rootfs) at their new place."""
    config = state["config"]
    for ns in config["namespaces"]:
        if ns["type"] == "NEWNET" and ns.get("path") == str(netns):
            ns["path"] = ""
    old, new = (str(p) for p in moved)
    labels = [la for la in config.get("labels") or []
              if not la.startswith(f"{CRIU_CONFIG_LABEL}=")]
    config["labels"] = [la.replace(f"bundle={old}", f"bundle={new}", 1) for la in labels]
    if config["rootfs"].startswith(f"{old}/"):
        config["rootfs"] = new + config["rootfs"][len(old):]
    return state


def write_state(state_dir: Path, state: dict) -> None:
    atomic_write(state_dir / "state.json", json.dumps(state))


# adopt and release
async def inspect(store: ContainerStore, name: str, where: Foreign) -> tuple[int, dict, Path]:
    """Every check, nothing changed: (init pid, bundle config, rootfs)."""
    await store.check_new(name)
    foreign = Runc(where.root, store.runc.work_dir, store.runc.binary)
    try:
        state = await foreign.state(where.id)
    except NotFound as exc:
        raise NotFound(f"runc has no container {where.id} under {where.root}") from exc
    check_running(state, where)
    bundle = Path(state.bundle)
    try:
        config = load_config(bundle)
    except (OSError, ValueError) as exc:
        raise GodwitError(f"cannot read its config {bundle}/config.json: {exc}") from exc
    rootfs = check_config(config, bundle)
    check_netns_kind(read_state(where.state_dir)["config"]["namespaces"])
    check_stdio(stdio_targets(state.pid))
    await asyncio.to_thread(check_netns, state.pid)
    return state.pid, config, rootfs


async def adopt(store: ContainerStore, name: str, where: Foreign) -> ContainerRecord:
    """Take a running runc container under this agent without stopping it."""
    pid, config, rootfs = await inspect(store, name, where)
    record = ContainerRecord(name, str(rootfs), False, time.time(),
                             adopted={"runc_root": str(where.root), "id": where.id,
                                      "cgroup": freezer_cgroup(pid)})
    original = (where.state_dir / "state.json").read_text()
    store.save(record)
    try:
        store.install_bundle(name, config, rootfs, own_netns=False)
        write_state(where.state_dir, with_godwit(json.loads(original),
                                                 store.criu_config(name)))
        store.runc.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.move(where.state_dir, store.runc.root / name)
    except (OSError, GodwitError) as exc:
        if where.state_dir.exists():
            atomic_write(where.state_dir / "state.json", original)
        store.forget(name)
        raise GodwitError(f"cannot adopt {name}: {exc}") from exc
    return record


async def release(store: ContainerStore, name: str, where: Foreign) -> Released:
    """Give a container back to plain runc under `where`; it keeps running."""
    record = store.record(name)
    if record.net:
        raise GodwitError(f"{name} has a godwit address (--ip) on the host bridge: "
                          "only a container without one can be released")
    state = await store.runc.state(name)
    if state.status != "running":
        raise Conflict(f"{name} is {state.status}, not running")
    if where.state_dir.exists():
        raise Conflict(f"runc already has a container {where.id} under {where.root}")
    netns = NETNS_DIR / store.networking.netns(name)
    released = store.root.parent / "released" / f"{name}-{time.time_ns()}"
    runc_state = read_state(store.runc.root / name)
    released.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(store.dir(name), released)
    write_state(store.runc.root / name,
                without_godwit(runc_state, netns, (store.dir(name), released)))
    where.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.move(store.runc.root / name, where.state_dir)
    if record.owns_netns:  # a netns godwit made: the container holds it from now on
        store.networking.delete(name)
    return Released(name=name, host=store.host, runc_root=str(where.root), id=where.id,
                    bundle=str(released / "bundle"))
