"""``corral image pull``/``push`` against a real registry (Debian's docker-registry on loopback)
and a real image store served over HTTP: images the tests build (ocikit), moved by skopeo,
checked and applied by corral. Bad input is refused with a clear error and leaves the store
as it was."""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ocikit import (
    V1_CONFIG,
    Layer,
    authfile,
    build_images,
    busybox_layer,
    layout,
    manifest_of,
    registry,
    retag_manifest,
    skopeo_push,
)
from storeserver import served_store

from corral.api.client import Client
from corral.errors import InvalidRequest, NotFound, TransferFailed
from corral.images import oci, oci_push
from corral.images.oci_config import read_tree_file, resolve
from corral.images.packstore import PackStore
from corral.images.store import ImageStore
from corral.images.tree import Entry, Manifest

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("oci")
    with registry(tmp / "registry") as host:
        lay = tmp / "layout"
        digests = build_images(lay)
        for tag in ("v1", "v2"):
            skopeo_push(lay, tag, f"docker://{host}/bb:{tag}")
        yield {"host": host, "layout": lay, "digests": digests}
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ImageStore, Client]]:
    with served_store(tmp_path / "store") as (store, url), Client(url, "t") as c:
        yield store, c


def pull(client: Client, ref: str, name: str, **kw: Any) -> tuple[Manifest, oci.Upload]:
    """What ``corral image pull`` does, in a scratch directory removed after."""
    with tempfile.TemporaryDirectory(prefix="test-pull-") as tmp, \
            PackStore(Path(tmp) / "chunks") as packs:
        m = oci.pull(ref, Path(tmp), packs, **kw)
        return m, oci.upload(client, packs, m, name)


def state(store: ImageStore) -> tuple[int, list[str]]:
    """What a failed pull must leave as it was: the chunks stored and the names."""
    return len(store.packs), store.names(shelves=True)


def by_path(m: Manifest) -> dict[str, Entry]:
    return {e.path: e for e in m.entries}


def test_two_tags_share_their_base(images: dict[str, Any],
                                   served: tuple[ImageStore, Client]) -> None:
    store, c = served
    host = images["host"]
    m1, up1 = pull(c, f"docker://{host}/bb:v1", "bb:v1", insecure=True)
    e = by_path(store.manifest("bb:v1"))
    assert "etc/base-file" not in e and "etc/passwd" in e and "bin/busybox" in e
    assert (e["srv/app"].uid, e["srv/app"].gid, e["srv/app"].mode) == (1000, 1000, 0o750)
    # hard-linked: the first path listed holds the data ('-' sorts before '.')
    assert e["srv/app/hello.txt"].kind == "h" and e["tmp"].mode == 0o1777
    assert e["srv/app/hello.txt"].target == "srv/app/hello-link"
    row = next(i for i in store.list() if i.name == "bb:v1")
    assert row.source == f"docker://{host}/bb:v1" and row.digest == images["digests"]["v1"]
    assert up1.chunks == len(m1.chunk_ids())

    before = len(store.packs)
    m2, up2 = pull(c, f"docker://{host}/bb:v2", "bb:v2", insecure=True)
    own = m2.chunk_ids() - m1.chunk_ids()

    def chunks(prefix: str) -> set[str]:
        return {cid for ent in m2.entries if ent.path.startswith(prefix)
                for _, ids in ent.extents for cid in ids}

    # every chunk of the shared base was there already, but for the file v1 whited out
    assert own == chunks("data/") | chunks("etc/base-file") and chunks("data/")
    assert up2.chunks == len(own)
    assert len(store.packs) - before == len(own) + 1  # its chunks and its manifest
    rows = {i.name: i for i in store.list()}
    assert rows["bb:v2"].unique_size == sum(len(store.packs.get(bytes.fromhex(x)))
                                            for x in own)
    assert rows["bb:v2"].digest == images["digests"]["v2"]


def test_the_config_resolves_as_docker_would(images: dict[str, Any],
                                             served: tuple[ImageStore, Client]) -> None:
    store, c = served
    host = images["host"]
    pull(c, f"docker://{host}/bb:v1", "v1", insecure=True)
    pull(c, f"docker://{host}/bb:v2", "v2", insecure=True)
    m1, m2 = store.manifest("v1"), store.manifest("v2")
    read1 = functools.partial(read_tree_file, m1, store.packs)
    run = resolve(m1.meta["config"], command=[], entrypoint=None, env={"MODE": "cli"},
                  driver="runc", read_file=read1)
    assert run.command == ["/bin/sh", "-c", V1_CONFIG["Cmd"][0]]
    assert run.env["GREETING"] == "hello-from-image" and run.env["MODE"] == "cli"
    assert run.env["HOME"] == "/home/app"
    assert run.process is not None
    assert (run.process["uid"], run.process["gid"], run.process["additional_gids"]) == (
        1000, 1000, [2000])
    assert run.process["cwd"] == "/srv/app" and run.process["stop_signal"] == 2
    assert run.process["exposed_ports"] == ["8080/tcp"]
    assert run.process["healthcheck"]["Test"] == ["CMD", "/bin/true"]
    assert resolve(m1.meta["config"], command=["id"], entrypoint=None, env={}, driver="runc",
                   read_file=read1).command == ["/bin/sh", "-c", "id"]
    assert resolve(m1.meta["config"], command=["id"], entrypoint=[], env={}, driver="runc",
                   read_file=read1).command == ["id"]
    v2 = resolve(m2.meta["config"], command=[], entrypoint=None, env={}, driver="runc",
                 read_file=functools.partial(read_tree_file, m2, store.packs))
    assert v2.command == ["sleep", "600"] and v2.process is not None
    assert (v2.process["uid"], v2.process["gid"], v2.process["additional_gids"]) == (
        1000, 2000, [])
    with pytest.raises(InvalidRequest, match="process driver"):
        resolve(m1.meta["config"], command=[], entrypoint=None, env={}, driver="process",
                read_file=read1)


def test_missing_tag_is_not_found(images: dict[str, Any],
                                  served: tuple[ImageStore, Client]) -> None:
    store, c = served
    was = state(store)
    with pytest.raises(NotFound) as err:
        pull(c, f"docker://{images['host']}/bb:nope", "nope", insecure=True)
    assert "nope" in err.value.message and err.value.hint
    with pytest.raises(NotFound):
        pull(c, f"oci:{images['layout']}:nope", "nope")
    assert state(store) == was


def test_a_tampered_blob_is_refused(images: dict[str, Any], served: tuple[ImageStore, Client],
                                    tmp_path: Path) -> None:
    store, c = served
    lay = tmp_path / "tampered"
    shutil.copytree(images["layout"], lay)
    manifest, _ = manifest_of(lay, "v1")
    top = lay / "blobs" / "sha256" / manifest["layers"][-1]["digest"].split(":")[1]
    body = bytearray(top.read_bytes())
    body[len(body) // 2] ^= 0xFF
    top.write_bytes(bytes(body))
    was = state(store)
    with pytest.raises(InvalidRequest, match="digest") as err:
        pull(c, f"oci:{lay}:v1", "tampered")
    assert err.value.hint and state(store) == was
    # corral's own check, on a layout as skopeo would have left it
    with PackStore(tmp_path / "scratch") as packs, pytest.raises(InvalidRequest) as own:
        oci.read_image(lay, packs, tag="v1")
    assert "does not match its digest" in own.value.message


def _bad_image(lay: Path, top: bytes) -> None:
    layout(lay, [busybox_layer(), top], {"Cmd": ["sh"]}, "bad")


@pytest.mark.parametrize(("top", "says"), [
    (Layer().add("../../escape", data=b"x").raw(), "'..'"),
    (Layer().add("/etc/evil", data=b"x").raw(), "absolute"),
    (Layer().add("out", "l", link="/").add("out/etc/shadow", data=b"x").raw(), "symlink"),
    (Layer().add("up", "l", link="../../../..").add("up/tmp/x", data=b"x").raw(), "symlink"),
    (Layer().add("grab", "h", link="../../etc/shadow").raw(), "'..'"),
])
def test_layers_that_would_escape_are_refused(served: tuple[ImageStore, Client],
                                              tmp_path: Path, top: bytes, says: str) -> None:
    store, c = served
    lay = tmp_path / "bad"
    _bad_image(lay, top)
    was = state(store)
    with pytest.raises(InvalidRequest) as err:
        pull(c, f"oci:{lay}:bad", "bad")
    assert says in err.value.message and "layer 2 of 2" in err.value.message
    assert state(store) == was
    assert not list(tmp_path.glob("**/shadow")) and not (tmp_path.parent / "escape").exists()


def test_a_layer_larger_than_declared_is_refused(images: dict[str, Any],
                                                 served: tuple[ImageStore, Client],
                                                 tmp_path: Path) -> None:
    store, c = served
    lay = tmp_path / "lying"
    shutil.copytree(images["layout"], lay)
    manifest, _ = manifest_of(lay, "v2")
    manifest["layers"][-1]["size"] -= 100
    retag_manifest(lay, "v2", manifest)
    was = state(store)
    with pytest.raises(InvalidRequest, match="larger") as err:
        pull(c, f"oci:{lay}:v2", "lying")
    assert err.value.hint and state(store) == was


def test_a_registry_with_auth(images: dict[str, Any], served: tuple[ImageStore, Client],
                              tmp_path: Path) -> None:
    _, c = served
    with registry(tmp_path / "reg", users={"alice": "s3cret"}) as host:
        auth = authfile(tmp_path / "auth.json", host, "alice", "s3cret")
        skopeo_push(images["layout"], "v2", f"docker://{host}/private:v2", auth=auth)
        with pytest.raises(TransferFailed) as err:
            pull(c, f"docker://{host}/private:v2", "private", insecure=True)
        assert "--authfile" in err.value.hint
        wrong = authfile(tmp_path / "wrong.json", host, "alice", "nope")
        with pytest.raises(TransferFailed):
            pull(c, f"docker://{host}/private:v2", "private", insecure=True,
                 authfile=str(wrong))
        m, _ = pull(c, f"docker://{host}/private:v2", "private", insecure=True,
                    authfile=str(auth))
        assert "data/blob" in by_path(m)


def _same(a: Manifest, b: Manifest) -> None:
    def shape(m: Manifest) -> list[tuple[Any, ...]]:
        return [(e.path, e.kind, e.mode, e.uid, e.gid, e.size, e.target, e.extents,
                 e.mtime_ns // 10**9) for e in m.entries if e.path != "."]

    assert shape(a) == shape(b)


def test_push_and_pull_back(images: dict[str, Any], served: tuple[ImageStore, Client],
                            tmp_path: Path) -> None:
    store, c = served
    host = images["host"]
    pull(c, f"docker://{host}/bb:v1", "orig", insecure=True)
    with PackStore(tmp_path / "push-chunks") as packs:
        digest = oci_push.push(c, "orig", f"docker://{host}/pushed:1", tmp_path / "push",
                               packs, insecure=True)
    assert digest.startswith("sha256:")
    back, _ = pull(c, f"docker://{host}/pushed:1", "back", insecure=True)
    _same(store.manifest("orig"), back)
    assert back.meta["config"] == store.manifest("orig").meta["config"]
    assert back.meta["digest"] == digest and back.meta["layers"] == 1


def test_archives(images: dict[str, Any], served: tuple[ImageStore, Client],
                  tmp_path: Path) -> None:
    _, c = served
    lay = images["layout"]
    oa, da = tmp_path / "image.oci.tar", tmp_path / "image.docker.tar"
    for dest in (f"oci-archive:{oa}", f"docker-archive:{da}:bb:v2"):
        subprocess.run(["skopeo", "copy", "--quiet", f"oci:{lay}:v2", dest], check=True,
                       capture_output=True, timeout=120)
    ref, _ = pull(c, f"oci:{lay}:v2", "from-layout")
    for src, name in ((f"oci-archive:{oa}", "from-oci-archive"),
                      (f"docker-archive:{da}", "from-docker-archive")):
        m, _ = pull(c, src, name)
        _same(ref, m)
        assert m.meta["config"]["User"] == "1000:2000"


def test_bad_references(served: tuple[ImageStore, Client]) -> None:
    _, c = served
    for ref in ("registry.example/repo:tag", "dir:/tmp/x", "docker://", "oci:"):
        with pytest.raises(InvalidRequest, match="docker://"):
            pull(c, ref, "x")
