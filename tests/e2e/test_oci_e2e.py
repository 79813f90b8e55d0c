"""As root: standard images pulled from a registry and run under runc on a ``--netns`` fleet.

The registry (Debian's docker-registry, on loopback) holds two tags the test builds from
busybox-static (ocikit): they share a base layer; v1 whites out a base file and runs as a
named non-root user with a supplementary group, an entrypoint, env, a workdir and SIGINT as
its stop signal. ``corral image pull`` takes both (the second sends only its own layer's
chunks), ``corral run --image`` runs v1 as the image says (the uid inside the container, and
the host's shifted one, its env laid under ``-e``, its workdir, the whited-out file absent),
``corral stop`` sends the image's stop signal, and the instance keeps all of it through a
migration, a standby's promotion and a shelve/unshelve.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleetkit import Fleet, fleet_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from ocikit import build_images, registry, skopeo_push

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="--netns fleets need root"),
    pytest.mark.skipif(shutil.which("runc") is None or shutil.which("rsync") is None,
                       reason="needs runc and rsync"),
]

#: container ids are host ids from here (drivers/runc_userns.py)
HOST_BASE = 0x7000_0000


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("oci-e2e")
    extra = os.urandom(300_000)
    with registry(tmp / "registry") as host, \
            fleet_for(tmp / "fleet", "--hosts", "2", "--netns") as fleet:
        lay = tmp / "layout"
        digests = build_images(lay, extra)
        for tag in ("v1", "v2"):
            skopeo_push(lay, tag, f"docker://{host}/bb:{tag}")
        yield {"fleet": fleet, "host": host, "digests": digests, "extra": extra}
    shutil.rmtree(tmp, ignore_errors=True)


def logs_until(f: Fleet, name: str, pattern: str, count: int = 1,
               timeout: float = 40) -> list[re.Match[str]]:
    deadline = time.monotonic() + timeout
    while True:
        found = list(re.finditer(pattern, f.ok("logs", name)))
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"{name} never printed {pattern!r} x{count}: " \
                                            f"{f.ok('logs', name)!r}"
        time.sleep(0.3)


def host_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def chunks_of(data: bytes) -> int:
    """How many chunks corral cuts these bytes into (as an import would)."""
    from corral.images.packstore import PackStore
    from corral.images.tree import snapshot

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tree").mkdir()
        (Path(tmp) / "tree" / "blob").write_bytes(data)
        with PackStore(Path(tmp) / "packs") as packs:
            m = snapshot(Path(tmp) / "tree", packs)
    return len(m.chunk_ids())


def test_pull_run_migrate_shelve(setup: dict[str, Any]) -> None:
    f: Fleet = setup["fleet"]
    host = setup["host"]
    out1 = f.ok("image", "pull", f"docker://{host}/bb:v1", "--insecure")
    assert "bb:v1: pulled" in out1
    out2 = f.ok("image", "pull", f"docker://{host}/bb:v2", "--insecure", "--name", "second")
    new = int(re.search(r"(\d+) new chunks", out2).group(1))  # type: ignore[union-attr]
    # its own layer's data, and the one base file v1 had whited out: the base was there
    assert new == chunks_of(setup["extra"]) + 1
    rows = {r["name"]: r for r in f.json("image", "ls")}
    assert rows["bb:v1"]["source"] == f"docker://{host}/bb:v1"
    assert rows["bb:v1"]["digest"] == setup["digests"]["v1"]
    assert rows["second"]["digest"] == setup["digests"]["v2"]
    table = f.ok("image", "ls")
    assert "SOURCE" in table and setup["digests"]["v1"][:19] in table
    refused = f.cli("image", "pull", f"docker://{host}/bb:nope", "--insecure")
    assert refused.returncode == 4 and "no such image or tag" in refused.stderr
    assert "nope" not in {r["name"] for r in f.json("image", "ls")}

    # the image's command, user, env (under -e), workdir; its whiteout
    f.ok("run", "web", "--image", "bb:v1", "--host", "host1", "-e", "GREETING=from-cli")
    view = f.wait_state("web", {"running"})
    assert view["driver"] == "runc" and view["command"][:2] == ["/bin/sh", "-c"]
    cfg = view["image_config"]
    assert (cfg["uid"], cfg["gid"], cfg["additional_gids"], cfg["cwd"]) == (
        1000, 1000, [2000], "/srv/app")
    assert cfg["exposed_ports"] == ["8080/tcp"] and cfg["stop_signal"] == 2
    line = ("uid=1000 gid=1000 groups=1000 2000 cwd=/srv/app greeting=from-cli "
            "home=/home/app")
    logs_until(f, "web", re.escape(line))
    logs_until(f, "web", "base-file-absent")
    assert host_uid(view["pid"]) == HOST_BASE + 1000
    shown = f.ok("show", "web")
    assert "8080/tcp" in shown and "app (1000:1000)" in shown and "SIGINT" in shown

    # a command after -- replaces Cmd under the entrypoint; the image's stop signal is sent
    f.ok("run", "sig", "--image", "bb:v1", "--host", "host2", "--",
         "trap 'echo got-INT; exit 0' INT; echo mode=$MODE; while :; do sleep 1; done")
    f.wait_state("sig", {"running"})
    logs_until(f, "sig", "mode=image")
    f.ok("stop", "sig")
    logs_until(f, "sig", "got-INT")
    # --entrypoint replaces the image's (and drops its Cmd); v2's numeric user and group
    f.ok("run", "ep", "--image", "second", "--host", "host2", "--entrypoint", "/bin/sh",
         "--", "-c", "echo ids=$(id -u):$(id -g); exec sleep 600")
    logs_until(f, "ep", "ids=1000:2000")

    # migrate: the same process on the other host
    f.ok("migrate", "web", "--to", "host2", timeout=600)
    moved = f.wait_state("web", {"running"})
    assert moved["host"] == "host2" and moved["image_config"] == cfg
    logs_until(f, "web", re.escape(line), count=2)
    assert host_uid(moved["pid"]) == HOST_BASE + 1000

    # a warm standby back on host1, promoted: the image's process there too
    f.ok("standby", "add", "web", "--host", "host1", "--every", "1h", timeout=600)
    f.ok("standby", "sync", "web", timeout=600)
    (sb,) = f.json("standby", "ls")
    assert sb["instance"] == "web" and sb["state"] == "ready", sb
    f.ok("standby", "promote", "web", timeout=600)
    promoted = f.wait_state("web", {"running"}, timeout=60)
    assert promoted["host"] == "host1" and promoted["image_config"] == cfg
    logs_until(f, "web", re.escape(line), count=3, timeout=60)
    assert host_uid(promoted["pid"]) == HOST_BASE + 1000
    f.ok("standby", "rm", "web")

    # shelve and unshelve: still the image's process
    f.ok("shelve", "web", "--offload-after", "0", timeout=600)
    f.wait_state("web", {"shelved"})
    f.ok("unshelve", "web", "--to", "host1", timeout=600)
    back = f.wait_state("web", {"running"}, timeout=60)
    assert back["host"] == "host1" and back["image_config"] == cfg
    # the fourth run printed it too, on host1 again: each visit's lines are a run of their
    # own there (not taken for repeats of an earlier visit's)
    logs_until(f, "web", re.escape(line), count=4, timeout=60)
    logs_until(f, "web", "base-file-absent", count=4)
    assert host_uid(back["pid"]) == HOST_BASE + 1000

    for name in ("web", "sig", "ep"):
        f.ok("rm", "--force", name)
