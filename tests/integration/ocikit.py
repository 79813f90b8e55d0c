"""Standard images made by the tests themselves, and a registry to hold them.

A registry is Debian's ``docker-registry``, started on loopback on a free port with its storage
and its config file in the test's temp dir (htpasswd auth when asked), and killed by its pid
afterwards. Images are OCI layouts built here from busybox-static, layer by layer (tar members
written one by one, so a test can put whiteouts, hard links and hostile paths in them), pushed
with skopeo.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.agent.busybox import find_static_busybox

APPLETS = ("sh", "id", "pwd", "env", "cat", "ls", "sleep", "echo", "test", "stat", "touch",
           "true", "false", "kill", "mkdir")
MediaLayer = "application/vnd.oci.image.layer.v1.tar+gzip"


def need_tools() -> None:
    for tool in ("skopeo", "docker-registry"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (bash scripts/bootstrap installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def registry(tmp: Path, users: dict[str, str] | None = None) -> Iterator[str]:
    """A registry on 127.0.0.1 (``host:port``), storage under ``tmp``; with ``users``
    (name -> password) it asks for basic auth."""
    need_tools()
    tmp.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    auth = ""
    if users:
        try:  # deprecated, still in 3.11 and 3.12: libxcrypt's bcrypt for the htpasswd file
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                import crypt as _crypt
        except ImportError:
            pytest.skip("no crypt module to write a bcrypt htpasswd with")
        lines = [f"{u}:{_crypt.crypt(p, _crypt.mksalt(_crypt.METHOD_BLOWFISH, rounds=1 << 5))}"
                 for u, p in users.items()]
        (tmp / "htpasswd").write_text("\n".join(lines) + "\n")
        auth = f"auth:\n  htpasswd:\n    realm: test\n    path: {tmp / 'htpasswd'}\n"
    cfg = tmp / "registry.yml"
    cfg.write_text(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                   f"    rootdirectory: {tmp / 'data'}\n  delete:\n    enabled: true\n"
                   f"http:\n  addr: 127.0.0.1:{port}\n  secret: test-only\n{auth}")
    log = (tmp / "registry.log").open("wb")
    proc = subprocess.Popen(["docker-registry", "serve", str(cfg)], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2).close()
                break
            except urllib.error.HTTPError:
                break  # 401 with auth: it answers
            except OSError:
                assert proc.poll() is None, (tmp / "registry.log").read_text()
                assert time.monotonic() < deadline, "the registry did not start"
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(10)
        log.close()


def authfile(path: Path, host: str, user: str, password: str) -> Path:
    import base64

    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return path


# --- layers -------------------------------------------------------------------------------------


class Layer:
    """One layer's tar, member by member."""

    def __init__(self) -> None:
        self.members: list[tuple[tarfile.TarInfo, bytes]] = []

    def add(self, name: str, kind: str = "f", data: bytes = b"", *, mode: int = 0o644,
            uid: int = 0, gid: int = 0, link: str = "") -> Layer:
        t = tarfile.TarInfo(name)
        t.type = {"f": tarfile.REGTYPE, "d": tarfile.DIRTYPE, "l": tarfile.SYMTYPE,
                  "h": tarfile.LNKTYPE}[kind]
        t.mode, t.uid, t.gid, t.linkname, t.mtime = mode, uid, gid, link, 1_700_000_000
        t.size = len(data) if kind == "f" else 0
        self.members.append((t, data))
        return self

    def raw(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for t, data in self.members:
                tar.addfile(t, io.BytesIO(data) if t.isreg() else None)
        return buf.getvalue()


def busybox_layer() -> bytes:
    """A base layer: busybox-static and a few applets, users root and app (1000, also in
    group staff 2000), and ``etc/base-file`` for a later layer to white out."""
    bb = find_static_busybox().read_bytes()
    layer = Layer().add("bin", "d", mode=0o755).add("bin/busybox", data=bb, mode=0o755)
    for applet in APPLETS:
        layer.add(f"bin/{applet}", "l", link="busybox")
    return (layer.add("etc", "d", mode=0o755)
            .add("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"
                                    b"app:x:1000:1000:app:/home/app:/bin/sh\n")
            .add("etc/group", data=b"root:x:0:\napp:x:1000:\nstaff:x:2000:app\n")
            .add("etc/base-file", data=b"from the base layer\n")
            .add("tmp", "d", mode=0o1777).add("root", "d", mode=0o700)
            .add("home", "d", mode=0o755).add("home/app", "d", mode=0o755, uid=1000, gid=1000)
            .raw())


def layout(dest: Path, layers: list[bytes], config: dict[str, Any], tag: str = "latest",
           compress: bool = True) -> str:
    """Write an OCI layout with these layer tars (in order) and this run config; returns
    the manifest's digest. More tags may be written into the same layout."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    descs = []
    for raw in layers:
        body = gzip.compress(raw, mtime=0) if compress else raw
        media = MediaLayer if compress else "application/vnd.oci.image.layer.v1.tar"
        descs.append(blob(blobs, body, media))
    cfg = {"architecture": _arch(), "os": "linux", "config": config,
           "rootfs": {"type": "layers",
                      "diff_ids": [f"sha256:{hashlib.sha256(r).hexdigest()}" for r in layers]}}
    c = blob(blobs, json.dumps(cfg).encode(), "application/vnd.oci.image.config.v1+json")
    m = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
         "config": c, "layers": descs}
    md = blob(blobs, json.dumps(m).encode(), "application/vnd.oci.image.manifest.v1+json")
    md["annotations"] = {"org.opencontainers.image.ref.name": tag}
    index_path = dest / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {
        "schemaVersion": 2, "manifests": []}
    index["manifests"] = [d for d in index["manifests"] if d.get("annotations", {}).get(
        "org.opencontainers.image.ref.name") != tag] + [md]
    index_path.write_text(json.dumps(index))
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return str(md["digest"])


def blob(blobs: Path, body: bytes, media: str) -> dict[str, Any]:
    digest = hashlib.sha256(body).hexdigest()
    (blobs / digest).write_bytes(body)
    return {"mediaType": media, "digest": f"sha256:{digest}", "size": len(body)}


def _arch() -> str:
    m = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)


def manifest_of(lay: Path, tag: str) -> tuple[dict[str, Any], Path]:
    """The manifest of ``tag`` and the path of its blob."""
    index = json.loads((lay / "index.json").read_text())
    desc = next(d for d in index["manifests"]
                if d["annotations"]["org.opencontainers.image.ref.name"] == tag)
    path = lay / "blobs" / "sha256" / desc["digest"].split(":")[1]
    return json.loads(path.read_text()), path


def retag_manifest(lay: Path, tag: str, manifest: dict[str, Any]) -> None:
    """Point ``tag`` at an edited manifest (written as a new blob)."""
    md = blob(lay / "blobs" / "sha256", json.dumps(manifest).encode(),
              "application/vnd.oci.image.manifest.v1+json")
    md["annotations"] = {"org.opencontainers.image.ref.name": tag}
    index = json.loads((lay / "index.json").read_text())
    index["manifests"] = [d for d in index["manifests"]
                          if d["annotations"]["org.opencontainers.image.ref.name"] != tag] + [md]
    (lay / "index.json").write_text(json.dumps(index))


# --- the two test images ------------------------------------------------------------------------

#: v1: a non-root named user with a supplementary group, an entrypoint, env and a workdir,
#: and a whiteout of the base layer's etc/base-file
V1_CONFIG = {
    "User": "app", "WorkingDir": "/srv/app", "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ["echo uid=$(id -u) gid=$(id -g) groups=$(id -G) cwd=$(pwd) greeting=$GREETING "
            "home=$HOME; test -e /etc/base-file && echo base-file-present || "
            "echo base-file-absent; exec sleep 600"],
    "Env": ["PATH=/bin", "GREETING=hello-from-image", "MODE=image"],
    "ExposedPorts": {"8080/tcp": {}}, "StopSignal": "SIGINT",
    "Healthcheck": {"Test": ["CMD", "/bin/true"], "Interval": 30_000_000_000},
}
#: v2: a numeric user and group, no entrypoint, only its own extra data
V2_CONFIG = {"User": "1000:2000", "Cmd": ["sleep", "600"], "Env": ["PATH=/bin"]}


def v1_layer() -> bytes:
    return (Layer().add("etc/.wh.base-file").add("srv", "d", mode=0o755)
            .add("srv/app", "d", mode=0o750, uid=1000, gid=1000)
            .add("srv/app/hello.txt", data=b"hello\n", uid=1000, gid=1000)
            .add("srv/app/hello-link", "h", link="srv/app/hello.txt").raw())


def v2_layer(extra: bytes) -> bytes:
    return Layer().add("data", "d").add("data/blob", data=extra).raw()


def build_images(lay: Path, extra: bytes | None = None) -> dict[str, str]:
    """Tags v1 and v2 in one layout (they share the base layer); their manifest digests."""
    base = busybox_layer()
    extra = extra if extra is not None else os.urandom(400_000)
    return {"v1": layout(lay, [base, v1_layer()], V1_CONFIG, "v1"),
            "v2": layout(lay, [base, v2_layer(extra)], V2_CONFIG, "v2")}


def skopeo_push(lay: Path, tag: str, dest: str, auth: Path | None = None) -> None:
    args = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"]
    if auth is not None:
        args += ["--dest-authfile", str(auth)]
    subprocess.run([*args, f"oci:{lay}:{tag}", dest], check=True, capture_output=True,
                   timeout=120)
