"""Containers from OCI images: `oci:DIR[:TAG]` (an OCI image layout) or `docker-archive:FILE`,
paths on the agent's host.

skopeo turns a docker-archive into an OCI layout; umoci unpacks the layout's layers, whiteouts
honoured, into a rootfs. Both work in a staging dir under the agent's state dir, which goes
whatever happens; the rootfs then moves into the container's dir and the container starts
the one way every container does (ContainerStore.start), with the config image_config maps.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from godwit.containers import ContainerRecord, ContainerStore
from godwit.image_config import (
    ImageError,
    Overrides,
    Provenance,
    check_before_unpack,
    exposed_ports,
    image_settings,
    provenance_fields,
    runtime_config,
)
from godwit.network import ContainerNet

TRANSPORTS = ("oci", "docker-archive")
STAGING = "unpacking"  # under the agent's state dir: one dir per image being unpacked
REF_NAME = "org.opencontainers.image.ref.name"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
          "s390x": "s390x", "riscv64": "riscv64"}
CONVERTED_TAG = "image"


@dataclass(frozen=True)
class ImageRef:
    """A parsed image reference; `text` is what the operator wrote."""

    transport: str
    path: Path
    tag: str | None
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Manifest:
    """The image a tag of an OCI layout names: its tag, manifest digest and image config."""

    tag: str
    digest: str
    config: dict[str, Any]


def parse_ref(text: str) -> ImageRef:
    """`oci:DIR[:TAG]` or `docker-archive:FILE` (absolute paths without ':')."""
    transport, sep, rest = (text or "").partition(":")
    if not sep or transport not in TRANSPORTS or not rest:
        raise ImageError(f"invalid image reference {text!r}: use oci:DIR[:TAG] or "
                         "docker-archive:FILE")
    path, _, tag = rest.partition(":")
    if transport == "docker-archive" and tag:
        raise ImageError(f"invalid image reference {text!r}: docker-archive:FILE takes no tag")
    if not path.startswith("/"):
        raise ImageError(f"invalid image reference {text!r}: the path must be absolute")
    return ImageRef(transport, Path(path), tag or None, text)


def absolute_reference(text: str) -> str:
    """The reference with a relative path made absolute (for the CLI, like --bundle)."""
    transport, sep, rest = text.partition(":")
    if sep and transport in TRANSPORTS and rest and not rest.startswith("/"):
        return f"{transport}:{os.path.abspath(rest)}"
    return text


def read_layout(layout: Path, tag: str | None, what: str) -> Manifest:
    """The manifest `tag` names in an OCI layout (the only or `latest` one without a tag),
    its blobs checked against their digests; `what` names the image in errors."""
    if not layout.exists():
        raise ImageError(f"{what}: no such directory")
    if not layout.is_dir():
        raise ImageError(f"{what}: not a directory")
    index = _layout_index(layout, what)
    tags = {_field(d, "annotations").get(REF_NAME): d for d in index}
    tags.pop(None, None)
    tag = tag or _default_tag(index, tags, what)
    if tag not in tags:
        known = ", ".join(sorted(tags)) or "none"
        raise ImageError(f"{what}: no tag {tag!r} in the layout (tags: {known})")
    descriptor = tags[tag]
    if descriptor.get("mediaType") != MANIFEST_TYPE:
        raise ImageError(f"{what}: tag {tag!r} is a {descriptor.get('mediaType')}, not an "
                         "image manifest (multi-platform indexes are not supported)")
    manifest = _blob_json(layout, descriptor.get("digest"), what)
    config = _blob_json(layout, _field(manifest, "config").get("digest"), what)
    _check_platform(config, what)
    return Manifest(tag, descriptor["digest"], config)


def _field(value: dict, key: str) -> dict:
    """A JSON object member that must be an object ({} when absent or of another type)."""
    member = value.get(key)
    return member if isinstance(member, dict) else {}


def _layout_index(layout: Path, what: str) -> list[dict]:
    try:
        marker = json.loads((layout / "oci-layout").read_text())
        index = json.loads((layout / "index.json").read_text())
    except (OSError, ValueError) as exc:
        raise ImageError(f"{what}: not an OCI image layout "
                         "(no valid oci-layout and index.json)") from exc
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(marker, dict) or "imageLayoutVersion" not in marker or \
            not isinstance(manifests, list) or not all(isinstance(d, dict) for d in manifests):
        raise ImageError(f"{what}: not an OCI image layout")
    return manifests


def _default_tag(index: list[dict], tags: dict, what: str) -> str:
    if len(index) == 1 and len(tags) == 1:
        return next(iter(tags))
    if "latest" in tags or not tags:
        return "latest"
    raise ImageError(f"{what}: several images in the layout: add :TAG "
                     f"(tags: {', '.join(sorted(tags))})")


def _blob_json(layout: Path, digest: object, what: str) -> dict[str, Any]:
    """A JSON blob of the layout, refused unless its content has its digest."""
    if not isinstance(digest, str) or not DIGEST.match(digest):
        raise ImageError(f"{what}: unsupported or invalid blob digest {digest!r}")
    try:
        data = (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()
    except OSError as exc:
        raise ImageError(f"{what}: blob {digest[:19]} missing from the layout") from exc
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise ImageError(f"{what}: blob {digest[:19]} is corrupt (digest mismatch)")
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise ImageError(f"{what}: blob {digest[:19]} is not valid JSON") from exc
    if not isinstance(value, dict):
        raise ImageError(f"{what}: blob {digest[:19]} is not a JSON object")
    return value


def _check_platform(config: dict[str, Any], what: str) -> None:
    arch = ARCHES.get(platform.machine(), platform.machine())
    if config.get("os", "linux") != "linux" or config.get("architecture", arch) != arch:
        raise ImageError(f"{what}: the image is for {config.get('os')}/"
                         f"{config.get('architecture')}, this host is linux/{arch}")


async def _tool(argv: list[str], what: str, staging: Path) -> None:
    """Run skopeo/umoci; a failure becomes one line with the tool's own reason."""
    if not shutil.which(argv[0]):
        raise ImageError(f"{argv[0]} is not installed on this host (apt-get install {argv[0]})")
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "TMPDIR": str(staging)})
    try:
        _, err = await proc.communicate()
    except asyncio.CancelledError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode:
        raise ImageError(f"{what}: {argv[0]}: {tool_reason(err.decode(errors='replace'))}")


def tool_reason(stderr: str) -> str:
    """The last line of a tool's stderr, without logrus' or umoci's decoration."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return "failed"
    match = re.search(r'msg="((?:[^"\\]|\\.)*)"', lines[-1])
    text = match.group(1).replace('\\"', '"') if match else lines[-1]
    text = re.sub(r"^initializing source \S+: ", "", text)  # skopeo names the archive again
    return text.lstrip("\u2a2f\u2022 ").strip()  # umoci's cross and bullet


async def fetch(ref: ImageRef, staging: Path) -> tuple[Path, Manifest]:
    """The OCI layout holding the image (a docker-archive converted into `staging`) and the
    manifest to unpack."""
    if ref.transport == "oci":
        return ref.path, await asyncio.to_thread(read_layout, ref.path, ref.tag, str(ref))
    if not ref.path.is_file():
        raise ImageError(f"{ref}: {'not a file' if ref.path.exists() else 'no such file'}")
    layout = staging / "layout"
    await _tool(["skopeo", "copy", "--quiet", f"docker-archive:{ref.path}",
                 f"oci:{layout}:{CONVERTED_TAG}"], str(ref), staging)
    return layout, await asyncio.to_thread(read_layout, layout, CONVERTED_TAG, str(ref))


async def unpack(layout: Path, manifest: Manifest, rootfs: Path, what: str) -> None:
    """umoci: every layer in order, whiteouts and opaque dirs honoured, owners kept."""
    await _tool(["umoci", "--log", "error", "raw", "unpack", "--image",
                 f"{layout}:{manifest.tag}", str(rootfs)], what, rootfs.parent)


def read_image_file(rootfs: Path, relative: str) -> str:
    """A small text file of the image ('' when absent); symlinks are not followed, so that
    an image cannot make the agent read a file of the host."""
    path = rootfs
    for part in relative.split("/"):
        path = path / part
        if path.is_symlink():
            return ""
    try:
        return path.read_text(errors="replace") if path.is_file() else ""
    except OSError:
        return ""


async def create_from_image(store: ContainerStore, name: str, reference: str,
                            overrides: Overrides, net: ContainerNet | None) -> ContainerRecord:
    """Unpack the image and start container NAME from it; nothing stays behind on failure."""
    ref = parse_ref(reference)
    await store.check_new(name)
    staging = store.root.parent / STAGING / uuid.uuid4().hex
    staging.mkdir(parents=True)
    try:
        layout, manifest = await fetch(ref, staging)
        with _about(ref):
            check_before_unpack(manifest.config, overrides)
        await unpack(layout, manifest, staging / "rootfs", str(ref))
        with _about(ref):
            config = runtime_config(
                manifest.config, overrides, hostname=name,
                provenance=Provenance(str(ref), manifest.digest,
                                      exposed_ports(image_settings(manifest.config))),
                passwd=read_image_file(staging / "rootfs", "etc/passwd"),
                group=read_image_file(staging / "rootfs", "etc/group"))
        record = ContainerRecord(name, str(store.dir(name) / "rootfs"), True, time.time(),
                                 **provenance_fields(config))
        return await store.start(record, config, net, rootfs_from=staging / "rootfs")
    finally:
        await asyncio.to_thread(shutil.rmtree, staging, ignore_errors=True)


@contextlib.contextmanager
def _about(ref: ImageRef) -> Iterator[None]:
    """Name the image in an error of its config or of the overrides."""
    try:
        yield
    except ImageError as exc:
        raise ImageError(f"{ref}: {exc}") from exc


def sweep(state_dir: Path) -> None:
    """Drop what unpacks an earlier agent process left half way (at agent start)."""
    shutil.rmtree(state_dir / STAGING, ignore_errors=True)
