"""Unit tests: an image config mapped onto the container's process, image references, and
OCI layouts read (tags, digests) without unpacking anything."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from godwit.bundle import DEFAULT_PATH
from godwit.image_config import (
    ImageError,
    Overrides,
    Provenance,
    check_before_unpack,
    process_settings,
    provenance_fields,
    resolve_user,
    runtime_config,
)
from godwit.images import absolute_reference, parse_ref, read_layout, tool_reason

PASSWD = """root:x:0:0:root:/root:/bin/sh
# a comment
srv:x:1000:1000:server:/home/srv:/bin/sh
nobody:x:65534:65534::/:/bin/false
"""
GROUP = """root:x:0:
srv:x:1000:
net:x:1001:srv,other
audio:x:29:other
"""
SETTINGS = {"Entrypoint": ["/bin/netserver"], "Cmd": ["7000"], "User": "srv",
            "Env": ["PATH=/bin", "GREETING=hello"], "WorkingDir": "/srv",
            "ExposedPorts": {"7000/tcp": {}}}


def settings(**overrides: object) -> dict:
    return process_settings(SETTINGS, Overrides(**overrides), passwd=PASSWD, group=GROUP)


def test_image_settings_become_the_process() -> None:
    got = settings()
    assert got == {"args": ["/bin/netserver", "7000"], "cwd": "/srv", "uid": 1000, "gid": 1000,
                   "additional_gids": (1001,),
                   "env": {"PATH": "/bin", "HOME": "/home/srv", "GREETING": "hello"}}


def test_command_line_overrides_win() -> None:
    got = settings(env=("GREETING=bye", "EXTRA=a=b"), user="0:29", workdir="/tmp/",
                   args=("7001", "-v"))
    assert got["args"] == ["/bin/netserver", "7001", "-v"], "ARGS replace Cmd, not Entrypoint"
    assert (got["uid"], got["gid"], got["additional_gids"]) == (0, 29, ())
    assert got["env"] == {"PATH": "/bin", "HOME": "/root", "GREETING": "bye", "EXTRA": "a=b"}
    assert got["cwd"] == "/tmp"


def test_empty_args_override_replaces_cmd_with_nothing() -> None:
    assert settings(args=())["args"] == ["/bin/netserver"]


def test_defaults_without_user_env_or_workdir() -> None:
    got = process_settings({"Cmd": ["/bin/sh"]}, Overrides(), passwd="", group="")
    assert got["env"] == {"PATH": DEFAULT_PATH, "HOME": "/"}
    assert (got["uid"], got["gid"], got["cwd"]) == (0, 0, "/")


@pytest.mark.parametrize(("spec", "expected"), [
    ("", (0, 0, (), "/root")),
    ("srv", (1000, 1000, (1001,), "/home/srv")),
    ("1000", (1000, 1000, (1001,), "/home/srv")),
    ("srv:net", (1000, 1001, (), "/home/srv")),
    ("srv:5", (1000, 5, (), "/home/srv")),
    ("4242", (4242, 0, (), "/")),
    ("4242:4343", (4242, 4343, (), "/")),
    ("nobody:audio", (65534, 29, (), "/")),
])
def test_user_resolution(spec: str, expected: tuple) -> None:
    identity = resolve_user(spec, PASSWD, GROUP)
    assert (identity.uid, identity.gid, identity.additional_gids, identity.home) == expected


@pytest.mark.parametrize(("spec", "message"), [
    ("ghost", "unknown user 'ghost'"),
    ("srv:ghosts", "unknown group 'ghosts'"),
    ("99999999999", "unknown user"),
])
def test_unknown_users_and_groups_are_refused(spec: str, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        resolve_user(spec, PASSWD, GROUP)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"env": ("NOEQUALS",)}, "invalid --env entry 'NOEQUALS'"),
    ({"env": ("=v",)}, "invalid --env entry"),
    ({"workdir": "relative"}, "not an absolute path"),
])
def test_bad_overrides_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        settings(**overrides)


def test_an_image_without_a_command_needs_args() -> None:
    with pytest.raises(ImageError, match="neither Entrypoint nor Cmd"):
        process_settings({}, Overrides(), passwd=PASSWD, group=GROUP)
    assert process_settings({}, Overrides(args=("/bin/sh",)), passwd="", group="")["args"] \
        == ["/bin/sh"]


def test_overrides_from_json_round_trip_and_validation() -> None:
    overrides = Overrides(("A=1",), "srv", "/srv", ("x",))
    assert Overrides.from_json(overrides.to_json()) == overrides
    assert Overrides.from_json(None) == Overrides()
    for bad in ([], {"env": "A=1"}, {"args": [1]}, {"user": 5}, {"env": ["A"]}):
        with pytest.raises(ImageError):
            Overrides.from_json(bad)


def test_runtime_config_carries_the_provenance() -> None:
    provenance = Provenance("oci:/img:t", "sha256:" + "ab" * 32, ("7000/tcp",))
    config = runtime_config({"config": SETTINGS}, Overrides(), provenance, passwd=PASSWD,
                            group=GROUP, hostname="web")
    process = config["process"]
    assert process["args"] == ["/bin/netserver", "7000"]
    assert process["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [1001]}
    assert "GREETING=hello" in process["env"] and process["cwd"] == "/srv"
    assert process["capabilities"]["ambient"] == [], "a non-root process holds no capability"
    assert config["hostname"] == "web"
    assert provenance_fields(config) == {"image": "oci:/img:t", "image_digest": "sha256:"
                                         + "ab" * 32, "exposed_ports": ["7000/tcp"]}
    assert provenance_fields({"annotations": {"other": "x"}}) == {}


@pytest.mark.parametrize(("text", "parsed"), [
    ("oci:/srv/img", ("oci", "/srv/img", None)),
    ("oci:/srv/img:v1.2", ("oci", "/srv/img", "v1.2")),
    ("docker-archive:/srv/a.tar", ("docker-archive", "/srv/a.tar", None)),
])
def test_references(text: str, parsed: tuple) -> None:
    ref = parse_ref(text)
    assert (ref.transport, str(ref.path), ref.tag) == parsed and str(ref) == text


@pytest.mark.parametrize("text", ["", "/srv/img", "docker://busybox", "oci:", "oci:rel/dir",
                                  "docker-archive:/a.tar:name:tag"])
def test_bad_references_are_refused(text: str) -> None:
    with pytest.raises(ImageError, match="invalid image reference"):
        parse_ref(text)


def test_relative_references_are_made_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert absolute_reference("oci:img:t") == f"oci:{tmp_path}/img:t"
    assert absolute_reference("docker-archive:/a.tar") == "docker-archive:/a.tar"
    assert absolute_reference("nonsense") == "nonsense"


def test_tool_errors_become_their_reason() -> None:
    skopeo = ('time="2026-12-02T01:10:36Z" level=fatal msg="initializing source '
              'docker-archive:bad.tar: loading tar component manifest.json: unexpected EOF"\n')
    assert tool_reason(skopeo) == "loading tar component manifest.json: unexpected EOF"
    assert tool_reason("   \u2a2f tag is not found: nope   \n") == "tag is not found: nope"
    assert tool_reason("") == "failed"


def _blob(layout: Path, value: dict | bytes) -> str:
    data = value if isinstance(value, bytes) else json.dumps(value).encode()
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}"


def make_layout(layout: Path, tags: list[str], arch: str = "amd64") -> dict[str, str]:
    """A minimal layout (no layers): tag -> manifest digest."""
    layout.mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    digests, index = {}, []
    for tag in tags:
        config = _blob(layout, {"architecture": arch, "os": "linux", "config": {"Cmd": [tag]}})
        manifest = _blob(layout, {"schemaVersion": 2, "config": {"digest": config},
                                  "layers": []})
        digests[tag] = manifest
        index.append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "digest": manifest, "annotations":
                      {"org.opencontainers.image.ref.name": tag}})
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": index}))
    return digests


def test_layout_tags_and_digests(tmp_path: Path) -> None:
    one = make_layout(tmp_path / "one", ["v1"])
    assert read_layout(tmp_path / "one", None, "img").digest == one["v1"], "the only tag"
    two = make_layout(tmp_path / "two", ["v1", "latest"])
    assert read_layout(tmp_path / "two", None, "img").tag == "latest"
    manifest = read_layout(tmp_path / "two", "v1", "img")
    assert (manifest.digest, manifest.config["config"]["Cmd"]) == (two["v1"], ["v1"])


@pytest.mark.parametrize(("setup", "message"), [
    ("missing", "img: no such directory"),
    ("file", "img: not a directory"),
    ("plain", "img: not an OCI image layout"),
    ("unknown-tag", "no tag 'nope' in the layout (tags: a, b)"),
    ("ambiguous", "several images in the layout: add :TAG (tags: a, b)"),
    ("corrupt", "is corrupt (digest mismatch)"),
    ("arch", "the image is for linux/s390x"),
])
def test_bad_layouts_are_refused(tmp_path: Path, setup: str, message: str) -> None:
    layout, tag = tmp_path / "img", None
    if setup == "file":
        layout.write_text("x")
    elif setup == "plain":
        layout.mkdir()
    elif setup in ("unknown-tag", "ambiguous", "corrupt"):
        digests = make_layout(layout, ["a", "b"])
        tag = {"unknown-tag": "nope", "corrupt": "a"}.get(setup)
        if setup == "corrupt":
            blob = layout / "blobs" / "sha256" / digests["a"].removeprefix("sha256:")
            blob.write_text(blob.read_text().replace("2", "3"))
    elif setup == "arch":
        make_layout(layout, ["a"], arch="s390x")
    with pytest.raises(ImageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_layout(layout, tag, "img")


@pytest.mark.parametrize(("config", "message"), [
    ({"config": []}, "config section is not an object"),
    ({"config": {"Entrypoint": "/bin/sh"}}, "Entrypoint is not a list of strings"),
    ({"config": {"Env": [1]}}, "Env is not a list of strings"),
    ({"config": {"User": 0}}, "User is not a string"),
    ({"config": {"ExposedPorts": ["80/tcp"]}}, "ExposedPorts is not an object"),
    ({"config": {"Env": ["A=1"]}}, "neither Entrypoint nor Cmd"),
])
def test_malformed_image_configs_are_refused_before_unpacking(config: dict,
                                                              message: str) -> None:
    with pytest.raises(ImageError, match=message):
        check_before_unpack(config, Overrides())
