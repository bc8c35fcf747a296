"""An OCI image's config mapped onto godwit's runtime config.json.

Entrypoint + Cmd, Env, User (name or uid, with an optional :group or :gid, resolved against
the image's /etc/passwd and /etc/group) and WorkingDir become the container's process; the
command-line overrides win. ExposedPorts and the image's provenance (reference, manifest
digest) ride along as annotations of the config, so a migration carries them to the
destination's record (see provenance_fields).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

from godwit.bundle import DEFAULT_PATH, oci_config
from godwit.errors import GodwitError

ANNOTATION_IMAGE = "org.godwit.image"
ANNOTATION_DIGEST = "org.godwit.image.digest"
ANNOTATION_PORTS = "org.godwit.image.exposed-ports"
MAX_ID = 2**32 - 2  # (uid_t) -1 is "no id"


class ImageError(GodwitError):
    """An image or an override that cannot make a container (one line for the operator)."""


@dataclass(frozen=True)
class Overrides:
    """What the operator's command line changes in the image's config."""

    env: tuple[str, ...] = ()  # K=V, over the image's Env
    user: str | None = None
    workdir: str | None = None
    args: tuple[str, ...] | None = None  # replaces Cmd (the Entrypoint stays)

    def to_json(self) -> dict[str, Any]:
        return {"env": list(self.env), "user": self.user, "workdir": self.workdir,
                "args": None if self.args is None else list(self.args)}

    @classmethod
    def from_json(cls, raw: object) -> Overrides:
        """Validated overrides from an API request body (None: none)."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ImageError("overrides must be a JSON object")
        env, args = raw.get("env") or [], raw.get("args")
        if not _strings(env) or (args is not None and not _strings(args)):
            raise ImageError("overrides: env and args must be lists of strings")
        for key in ("user", "workdir"):
            if raw.get(key) is not None and not isinstance(raw[key], str):
                raise ImageError(f"overrides: {key} must be a string")
        parse_env(env, "--env")
        return cls(tuple(env), raw.get("user") or None, raw.get("workdir") or None,
                   None if args is None else tuple(args))


@dataclass(frozen=True)
class Identity:
    """Who the container's process runs as."""

    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    home: str = "/"


@dataclass(frozen=True)
class Provenance:
    """Where a container's rootfs and config came from."""

    image: str
    digest: str
    exposed_ports: tuple[str, ...] = ()


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def parse_env(items: list[str] | tuple[str, ...], what: str) -> dict[str, str]:
    """`K=V` items as a dict (a later K wins); anything else is refused."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or "\0" in item:
            raise ImageError(f"invalid {what} entry {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def _table(text: str, fields: int) -> list[list[str]]:
    """Lines of a colon-separated file (passwd, group) with at least `fields` fields."""
    rows = [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]
    return [row for row in rows if len(row) >= fields]


def _number(text: str) -> int | None:
    return int(text) if text.isdigit() and int(text) <= MAX_ID else None


def resolve_user(spec: str, passwd: str, group: str) -> Identity:
    """`user`, `uid`, `user:group`, `uid:gid` (and mixes) against passwd/group texts.

    A name must be in the files; a bare uid need not (its gid is then 0). Without an
    explicit group the user also gets the groups that list it as a member.
    """
    user, has_group, group_part = (spec or "0").partition(":")
    users, groups = _table(passwd, 7), _table(group, 4)
    uid = _number(user)
    entry = next((u for u in users if (u[0] == user if uid is None else _number(u[2]) == uid)),
                 None)
    if entry is None and uid is None:
        raise ImageError(f"unknown user {user!r}: not in the image's /etc/passwd")
    if entry is not None:
        uid = _number(entry[2])
    if uid is None:
        raise ImageError(f"invalid uid for user {user!r} in the image's /etc/passwd")
    gid = (_number(entry[3]) if entry else 0) or 0
    home = entry[5] if entry and entry[5] else "/"
    if has_group:
        return Identity(uid, _resolve_group(group_part, groups), (), home)
    name = entry[0] if entry else None
    extra = sorted({g for row in groups if name and name in row[3].split(",")
                    and (g := _number(row[2])) is not None and g != gid})
    return Identity(uid, gid, tuple(extra), home)


def _resolve_group(spec: str, groups: list[list[str]]) -> int:
    gid = _number(spec)
    if gid is not None:
        return gid
    row = next((g for g in groups if g[0] == spec), None)
    gid = _number(row[2]) if row else None
    if gid is None:
        raise ImageError(f"unknown group {spec!r}: not in the image's /etc/group")
    return gid


def image_command(settings: dict[str, Any], overrides: Overrides) -> list[str]:
    """Entrypoint + Cmd, where the operator's arguments replace Cmd."""
    entrypoint = list(settings.get("Entrypoint") or [])
    cmd = list(overrides.args) if overrides.args is not None else list(settings.get("Cmd") or [])
    if not entrypoint + cmd:
        raise ImageError("the image has neither Entrypoint nor Cmd: give the command after --")
    return entrypoint + cmd


def working_dir(settings: dict[str, Any], overrides: Overrides) -> str:
    if overrides.workdir is not None:
        if not overrides.workdir.startswith("/"):
            raise ImageError(f"--workdir {overrides.workdir!r} is not an absolute path")
        return posixpath.normpath(overrides.workdir)
    return posixpath.normpath(posixpath.join("/", settings.get("WorkingDir") or "/"))


def process_settings(settings: dict[str, Any], overrides: Overrides, *, passwd: str,
                     group: str) -> dict[str, Any]:
    """The oci_config keywords for an image config's `config` section and the overrides."""
    identity = resolve_user(overrides.user or settings.get("User") or "", passwd, group)
    env = {"PATH": DEFAULT_PATH, "HOME": identity.home,
           **parse_env(settings.get("Env") or [], "image Env"),
           **parse_env(overrides.env, "--env")}
    return {"args": image_command(settings, overrides), "env": env,
            "cwd": working_dir(settings, overrides), "uid": identity.uid, "gid": identity.gid,
            "additional_gids": identity.additional_gids}


def exposed_ports(settings: dict[str, Any]) -> tuple[str, ...]:
    return tuple(sorted(settings.get("ExposedPorts") or {}))


def image_settings(image_config: dict[str, Any]) -> dict[str, Any]:
    """The `config` section of an image config, its members' types checked."""
    settings = image_config.get("config")
    settings = {} if settings is None else settings
    if not isinstance(settings, dict):
        raise ImageError("the image config's config section is not an object")
    for key in ("Entrypoint", "Cmd", "Env"):
        if settings.get(key) is not None and not _strings(settings[key]):
            raise ImageError(f"the image config's {key} is not a list of strings")
    for key in ("User", "WorkingDir"):
        if settings.get(key) is not None and not isinstance(settings[key], str):
            raise ImageError(f"the image config's {key} is not a string")
    if settings.get("ExposedPorts") is not None and \
            not isinstance(settings["ExposedPorts"], dict):
        raise ImageError("the image config's ExposedPorts is not an object")
    return settings


def check_before_unpack(image_config: dict[str, Any], overrides: Overrides) -> None:
    """What can be refused before unpacking: the config's types, the command, the workdir
    (a user is resolved against the image's files once unpacked)."""
    settings = image_settings(image_config)
    image_command(settings, overrides)
    working_dir(settings, overrides)


def runtime_config(image_config: dict[str, Any], overrides: Overrides, provenance: Provenance,
                   *, passwd: str, group: str, hostname: str) -> dict[str, Any]:
    """godwit's config.json for a container of this image (its provenance annotated)."""
    settings = image_settings(image_config)
    kwargs = process_settings(settings, overrides, passwd=passwd, group=group)
    config = oci_config(kwargs.pop("args"), hostname=hostname, **kwargs)
    config["annotations"] = {ANNOTATION_IMAGE: provenance.image,
                             ANNOTATION_DIGEST: provenance.digest,
                             ANNOTATION_PORTS: ",".join(provenance.exposed_ports)}
    return config


def provenance_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The ContainerRecord fields a config's image annotations give ({} for a bundle)."""
    annotations = config.get("annotations") or {}
    if ANNOTATION_IMAGE not in annotations:
        return {}
    ports = annotations.get(ANNOTATION_PORTS) or ""
    return {"image": annotations[ANNOTATION_IMAGE],
            "image_digest": annotations.get(ANNOTATION_DIGEST),
            "exposed_ports": [p for p in ports.split(",") if p]}
