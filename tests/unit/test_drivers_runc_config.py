"""The OCI config corral writes, runc's error text, and spec checks shared by the drivers."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from corral.drivers import runc_userns, runs
from corral.drivers.base import Spec
from corral.drivers.process import ProcessDriver
from corral.drivers.runc import RuncDriver, runc_message
from corral.drivers.runc_config import CAPABILITIES, build_config, write_bundle
from corral.drivers.runc_userns import CONTAINER_IDS, HOST_BASE, check_container_root
from corral.errors import InvalidRequest


def _spec(tmp_path: Path, **kw: object) -> Spec:
    args: dict[str, object] = {"name": "web", "command": ["httpd", "-f"],
                               "workdir": str(tmp_path), "rootfs": str(tmp_path / "root")}
    args.update(kw)
    return Spec(**args)  # type: ignore[arg-type]


def test_config_shares_the_network_namespace_and_sets_the_cgroup(tmp_path: Path) -> None:
    cfg = build_config(_spec(tmp_path), "host-1")
    kinds = {n["type"] for n in cfg["linux"]["namespaces"]}
    assert kinds == {"user", "pid", "ipc", "uts", "mount"}
    assert cfg["linux"]["cgroupsPath"] == "/corral/host-1/web"
    assert cfg["process"]["args"] == ["httpd", "-f"]
    assert cfg["process"]["cwd"] == "/"
    assert cfg["root"] == {"path": str(tmp_path / "root"), "readonly": False}
    sysfs = next(m for m in cfg["mounts"] if m["destination"] == "/sys")
    assert sysfs["type"] == "bind" and sysfs["source"] == "/sys"
    assert {"ro", "nosuid", "nodev", "noexec"} <= set(sysfs["options"])
    assert {m["destination"] for m in cfg["mounts"]} >= {"/proc", "/dev", "/dev/pts",
                                                        "/dev/shm", "/dev/mqueue"}
    assert "cpu" not in cfg["linux"]["resources"]
    assert "memory" not in cfg["linux"]["resources"]


def test_containers_run_in_a_user_namespace_by_default(tmp_path: Path) -> None:
    """The container's ids 0..65535 are host ids from HOST_BASE: its root is not the host's,
    whatever it does to its files (issue 10, item 7)."""
    cfg = build_config(_spec(tmp_path), "h", root_path="/run/corral-runc/root")
    want = [{"containerID": 0, "hostID": HOST_BASE, "size": CONTAINER_IDS}]
    assert cfg["linux"]["uidMappings"] == cfg["linux"]["gidMappings"] == want
    assert HOST_BASE > 65535  # no ordinary host user
    assert cfg["root"]["path"] == "/run/corral-runc/root"
    assert cfg["annotations"]["org.corral.rootfs"] == str(tmp_path / "root")
    assert cfg["process"]["user"] == {"uid": 0, "gid": 0}
    assert cfg["process"]["noNewPrivileges"] is True
    assert "CAP_NET_RAW" not in CAPABILITIES and "CAP_SYS_ADMIN" not in CAPABILITIES
    for mount in cfg["mounts"]:  # nothing of the host's but /sys (read-only) is bound in
        assert mount["type"] != "bind" or mount["source"] == "/sys"


def test_the_hosts_own_tree_is_never_a_containers_root(tmp_path: Path) -> None:
    """Its owners would move into the containers' range: refused before anything is done."""
    for host_tree in ("/", str(Path(sys.executable).resolve().parent),
                      str(Path(sys.executable).resolve().parent.parent), "/etc"):
        with pytest.raises(InvalidRequest, match="host's own system files"):
            check_container_root(host_tree)
    d = RuncDriver("h", str(tmp_path / "state"))
    with pytest.raises(InvalidRequest):
        d.create(_spec(tmp_path, rootfs="/"))
    (tmp_path / "root").mkdir()
    check_container_root(str(tmp_path / "root"))  # a tree made for a container: fine


def test_runc_is_unavailable_without_user_namespaces(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A host that forbids user namespaces says so once, at agent start, instead of failing
    every container's start."""
    monkeypatch.setattr(shutil, "which", lambda _: "/usr/sbin/runc")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(runc_userns, "user_namespaces_enabled", lambda: False)
    reason = RuncDriver("h", str(tmp_path / "state")).available() or ""
    assert "user namespaces" in reason and "max_user_namespaces" in reason


def test_config_limits_and_env(tmp_path: Path) -> None:
    cfg = build_config(_spec(tmp_path, cpus=1.5, memory_bytes=256 << 20,
                             env={"A": "1", "PATH": "/bin"}), "h")
    assert cfg["linux"]["resources"]["cpu"] == {"quota": 150000, "period": 100000}
    assert cfg["linux"]["resources"]["memory"] == {"limit": 256 << 20}
    assert "A=1" in cfg["process"]["env"]
    assert "PATH=/bin" in cfg["process"]["env"]


def test_bundle_is_valid_json(tmp_path: Path) -> None:
    path = write_bundle(tmp_path / "bundle", _spec(tmp_path), "h")
    assert json.loads(path.read_text())["ociVersion"]


def test_runc_messages_lose_their_timestamps() -> None:
    text = ('time="2024-01-01T00:00:00Z" level=error msg="container \\"x\\" does not exist"\n'
            '{"level":"error","msg":"unable to start container process","time":"t"}\n')
    assert runc_message(text) == ('container "x" does not exist; '
                                  "unable to start container process")
    assert runc_message("") == "(runc printed nothing)"


def test_runc_needs_a_rootfs(tmp_path: Path) -> None:
    d = RuncDriver("h", str(tmp_path / "state"))
    with pytest.raises(InvalidRequest) as err:
        d.create(_spec(tmp_path, rootfs=None))
    assert "--from" in err.value.hint


@pytest.mark.parametrize("name", ["", "-x", "a/b", "a b", "x" * 64])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidRequest):
        runs.check_spec(_spec(tmp_path, name=name))


def test_unknown_command_is_refused_before_anything_runs(tmp_path: Path) -> None:
    d = ProcessDriver("h", use_cgroup=False)
    h = d.create(_spec(tmp_path, command=["no-such-command-here"], rootfs=None))
    with pytest.raises(InvalidRequest):
        d.start(h)
    assert d.status(h).state == "created"


def test_workload_env_is_clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_TOKEN", "secret")
    env = runs.base_env(_spec(tmp_path, env={"X": "y"}))
    assert "CORRAL_TOKEN" not in env
    assert env["X"] == "y"
