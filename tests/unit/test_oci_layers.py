"""Layers applied in order into one tree (corral.images.oci_layers): whiteouts, opaque
directories, hard links, replaced entries, metadata, and the layers that must be refused."""

from __future__ import annotations

import base64
import io
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.errors import InvalidRequest
from corral.images.oci_layers import TreeBuilder
from corral.images.packstore import PackStore
from corral.images.tree import Entry, Manifest, materialize, snapshot


def member(name: str, kind: str = "f", data: bytes = b"", *, mode: int = 0o644,
           uid: int = 0, gid: int = 0, link: str = "", mtime: int = 1_700_000_000,
           xattrs: dict[str, bytes] | None = None) -> tuple[tarfile.TarInfo, bytes]:
    t = tarfile.TarInfo(name)
    t.type = {"f": tarfile.REGTYPE, "d": tarfile.DIRTYPE, "l": tarfile.SYMTYPE,
              "h": tarfile.LNKTYPE, "c": tarfile.CHRTYPE, "p": tarfile.FIFOTYPE}[kind]
    t.mode, t.uid, t.gid, t.mtime, t.linkname = mode, uid, gid, mtime, link
    if kind == "f":
        t.size = len(data)
    if kind == "c":
        t.devmajor, t.devminor = 1, 3
    if xattrs:
        t.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                         for k, v in xattrs.items()}
    return t, data


def layer(*members: tuple[tarfile.TarInfo, bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    buf.seek(0)
    return buf


@pytest.fixture
def packs(tmp_path: Path) -> Iterator[PackStore]:
    with PackStore(tmp_path / "packs") as p:
        yield p


def build(packs: PackStore, *layers: io.BytesIO) -> Manifest:
    b = TreeBuilder(packs)
    for i, raw in enumerate(layers):
        b.apply(raw, i, f"layer {i + 1}")
    return b.manifest()


def entries(m: Manifest) -> dict[str, Entry]:
    return {e.path: e for e in m.entries}


def content(m: Manifest, packs: PackStore, path: str) -> bytes:
    e = entries(m)[path]
    if e.kind == "h":
        e = entries(m)[e.target]
    return b"".join(packs.get(bytes.fromhex(c)) for _, ids in e.extents for c in ids)


def test_whiteout_hides_a_lower_file_and_directory(packs: PackStore) -> None:
    base = layer(member("etc", "d", mode=0o755), member("etc/motd", data=b"hi"),
                 member("etc/keep", data=b"k"), member("opt", "d"), member("opt/a", data=b"a"))
    top = layer(member("etc/.wh.motd"), member(".wh.opt"))
    m = build(packs, base, top)
    paths = set(entries(m))
    assert "etc/motd" not in paths and "opt" not in paths and "opt/a" not in paths
    assert "etc/keep" in paths
    assert not any(".wh." in p for p in paths)


def test_a_whiteout_hides_only_lower_layers(packs: PackStore) -> None:
    """The same layer may bring a file back and list its whiteout, in either order."""
    base = layer(member("a", data=b"old"), member("b", data=b"old"))
    top = layer(member("a", data=b"new"), member(".wh.a"), member(".wh.b"), member("b",
                                                                                  data=b"new"))
    m = build(packs, base, top)
    assert content(m, packs, "a") == b"new" and content(m, packs, "b") == b"new"


def test_opaque_directory_hides_everything_below_it(packs: PackStore) -> None:
    base = layer(member("d", "d"), member("d/old", data=b"1"), member("d/sub", "d"),
                 member("d/sub/deep", data=b"2"), member("d/keepdir", "d"),
                 member("d/keepdir/lower", data=b"3"), member("other", data=b"4"))
    # the marker comes after an entry of its own layer: that one stays
    top = layer(member("d/new", data=b"5"), member("d/keepdir/upper", data=b"6"),
                member("d/.wh..wh..opq"))
    m = build(packs, base, top)
    paths = set(entries(m))
    assert {"d", "d/new", "d/keepdir", "d/keepdir/upper", "other"} <= paths
    assert not paths & {"d/old", "d/sub", "d/sub/deep", "d/keepdir/lower"}


def test_hard_links_share_one_file(packs: PackStore) -> None:
    base = layer(member("bin", "d"), member("bin/tool", data=b"x" * 5000, mode=0o755),
                 member("bin/alias", "h", link="bin/tool"))
    # a later layer links to the lower file, under a name sorting before it
    top = layer(member("a-link", "h", link="bin/tool"))
    m = build(packs, base, top)
    e = entries(m)
    assert e["a-link"].kind == "f" and e["a-link"].size == 5000  # first listed holds the data
    assert e["bin/tool"].kind == "h" and e["bin/tool"].target == "a-link"
    assert e["bin/alias"].kind == "h" and e["bin/alias"].target == "a-link"
    assert e["bin/tool"].mode == 0o755


def test_replacing_a_linked_file_breaks_the_link(packs: PackStore) -> None:
    base = layer(member("one", data=b"shared"), member("two", "h", link="one"))
    top = layer(member("one", data=b"changed"))
    m = build(packs, base, top)
    assert content(m, packs, "one") == b"changed"
    assert content(m, packs, "two") == b"shared" and entries(m)["two"].kind == "f"


def test_whiteout_of_the_first_link_keeps_the_other(packs: PackStore) -> None:
    base = layer(member("a", data=b"data"), member("b", "h", link="a"))
    m = build(packs, base, layer(member(".wh.a")))
    assert "a" not in entries(m) and content(m, packs, "b") == b"data"


def test_file_over_directory_and_directory_over_directory(packs: PackStore) -> None:
    base = layer(member("x", "d"), member("x/in", data=b"1"), member("y", "d", mode=0o700),
                 member("y/in", data=b"2"))
    top = layer(member("x", data=b"now a file"), member("y", "d", mode=0o750, uid=7))
    m = build(packs, base, top)
    e = entries(m)
    assert e["x"].kind == "f" and "x/in" not in e
    assert e["y"].kind == "d" and e["y"].mode == 0o750 and e["y"].uid == 7 and "y/in" in e


def test_metadata_is_kept(packs: PackStore) -> None:
    m = build(packs, layer(
        member("srv", "d", mode=0o1777, uid=1000, gid=1001),
        member("srv/app", data=b"#!/bin/sh\n", mode=0o4755, uid=1000, gid=1001,
               mtime=1_600_000_123, xattrs={"user.note": b"\x00\xffbinary",
                                            "security.capability": b"\x01\x02"}),
        member("srv/link", "l", link="/etc/passwd", uid=5),
        member("dev", "d"), member("dev/null", "c", mode=0o666), member("srv/fifo", "p")))
    e = entries(m)
    app = e["srv/app"]
    assert (app.mode, app.uid, app.gid, app.mtime_ns) == (0o4755, 1000, 1001,
                                                           1_600_000_123 * 10**9)
    assert base64.b64decode(app.xattrs["user.note"]) == b"\x00\xffbinary"
    assert base64.b64decode(app.xattrs["security.capability"]) == b"\x01\x02"
    assert e["srv"].mode == 0o1777 and e["srv/link"].target == "/etc/passwd"
    assert e["dev/null"].kind == "c" and e["dev/null"].rdev == os.makedev(1, 3)
    assert e["srv/fifo"].kind == "p"


def test_missing_parents_are_made_and_order_has_parents_first(packs: PackStore) -> None:
    m = build(packs, layer(member("a/b/c/file", data=b"deep"), member("z", data=b"")))
    paths = [e.path for e in m.entries]
    assert paths.index("a") < paths.index("a/b") < paths.index("a/b/c") \
        < paths.index("a/b/c/file")
    assert entries(m)["a/b"].mode == 0o755 and entries(m)["z"].extents == []


def test_chunks_are_those_an_import_makes(packs: PackStore, tmp_path: Path) -> None:
    data = os.urandom(700_000) * 2
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "blob").write_bytes(data)
    imported = entries(snapshot(tree, packs))["blob"].extents
    pulled = entries(build(packs, layer(member("blob", data=data))))["blob"].extents
    assert pulled == imported


def test_materialized_tree_matches(packs: PackStore, tmp_path: Path) -> None:
    m = build(packs, layer(member("etc", "d"), member("etc/passwd", data=b"root:x:0:0::/:\n"),
                           member("etc/pw2", "h", link="etc/passwd"),
                           member("etc/mtab", "l", link="/proc/mounts")),
              layer(member("etc/hosts", data=b"127.0.0.1 localhost\n", mode=0o600)))
    out = tmp_path / "out"
    materialize(m, packs, out)
    assert (out / "etc/passwd").read_bytes() == b"root:x:0:0::/:\n"
    assert os.stat(out / "etc/passwd").st_ino == os.stat(out / "etc/pw2").st_ino
    assert os.readlink(out / "etc/mtab") == "/proc/mounts"
    assert stat.S_IMODE(os.stat(out / "etc/hosts").st_mode) == 0o600


@pytest.mark.parametrize(("bad", "says"), [
    (layer(member("../escape", data=b"x")), "'..'"),
    (layer(member("etc/../../escape", data=b"x")), "'..'"),
    (layer(member("/etc/passwd", data=b"x")), "absolute"),
    (layer(member("escape", "l", link="/"), member("escape/etc/shadow", data=b"x")),
     "symlink"),
    (layer(member("up", "l", link="../../.."), member("up/x", data=b"x")), "symlink"),
    (layer(member("f", data=b"x"), member("f/under", data=b"x")), "not a directory"),
    (layer(member("link", "h", link="../../etc/passwd")), "'..'"),
    (layer(member("link", "h", link="/etc/passwd")), "absolute"),
    (layer(member("link", "h", link="nothing")), "not a file"),
    (layer(member("d", "d"), member("link", "h", link="d")), "not a file"),
    (layer(member("s", "l", link="/etc"), member("link", "h", link="s/passwd")), "symlink"),
    (layer(member("s", "l", link="/etc"), member("s/.wh.passwd")), "symlink"),
])
def test_refused_layers(packs: PackStore, bad: io.BytesIO, says: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        build(packs, bad)
    assert says in err.value.message and "layer 1" in err.value.message
    assert err.value.hint


def test_symlinks_out_of_a_lower_layer_are_not_followed(packs: PackStore) -> None:
    """A symlink a lower layer left pointing out stays data; a later layer writing under it
    is refused, not written through."""
    base = layer(member("var", "d"), member("var/run", "l", link="/run"))
    with pytest.raises(InvalidRequest, match="symlink"):
        build(packs, base, layer(member("var/run/pid", data=b"1")))


def test_truncated_layer_is_refused(packs: PackStore) -> None:
    raw = layer(member("big", data=b"y" * 100_000)).getvalue()
    with pytest.raises(InvalidRequest, match="layer 1"):
        build(packs, io.BytesIO(raw[:50_000]))
