"""A manifest is data from the store, never a list of paths to trust: entries that would put
anything outside the destination are refused by name on import (over HTTP and in-process) and
again on materialise (a manifest already stored, from an older corral or tampered with), and
materialise never writes through a symlink. Symlinks themselves may point anywhere: they are
data inside the tree."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from storeserver import served_store

from corral.api.client import Client
from corral.errors import InvalidRequest
from corral.images.packstore import PackStore
from corral.images.store import PREFIX, ImageStore
from corral.images.transfer import materialize_image, push_tree
from corral.images.tree import Entry, Manifest, materialize

MODE_DIR, MODE_FILE = 0o755, 0o644


def d(path: str) -> Entry:
    return Entry(path, "d", MODE_DIR, os.getuid(), os.getgid(), 1_000_000_000)


def f(path: str, cid: str = "", size: int = 0) -> Entry:
    e = Entry(path, "f", MODE_FILE, os.getuid(), os.getgid(), 1_000_000_000, size=size)
    if cid:
        e.extents = [[0, [cid]]]
    return e


def link(path: str, target: str, kind: str = "l") -> Entry:
    return Entry(path, kind, 0o777, os.getuid(), os.getgid(), 1_000_000_000, target=target)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the destination holding a file a bad manifest goes after."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret").write_text("host data\n")
    return out


def listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))}


def bad_manifests(outside: Path, cid: str) -> dict[str, tuple[list[Entry], str]]:
    """name -> (entries, the path the refusal must name)."""
    abs_target = str(outside / "planted")
    return {
        "absolute": ([d("."), f(abs_target, cid, 5)], abs_target),
        "dotdot": ([d("."), f("../outside/planted", cid, 5)], "../outside/planted"),
        "inner-dotdot": ([d("."), d("a"), f("a/../../outside/planted", cid, 5)],
                         "a/../../outside/planted"),
        "nul": ([d("."), f("a\x00b", cid, 5)], "a\\x00b"),
        "empty": ([d("."), f("", cid, 5)], "''"),
        "through-symlink": ([d("."), link("esc", str(outside)), f("esc/planted", cid, 5)],
                            "esc/planted"),
        "dir-through-symlink": ([d("."), link("esc", str(outside)), d("esc/sub")], "esc/sub"),
        "hardlink-outside": ([d("."), link("grab", str(outside / "secret"), "h")], "grab"),
        "hardlink-dotdot": ([d("."), link("grab", "../outside/secret", "h")], "grab"),
        "hardlink-via-symlink": ([d("."), link("s", str(outside / "secret")),
                                  link("grab", "s", "h")], "grab"),
        "hardlink-forward": ([d("."), link("grab", "later", "h"), f("later", cid, 5)], "grab"),
        "duplicate": ([d("."), f("x", cid, 5), f("x", cid, 5)], "x"),
        "no-parent": ([d("."), f("nodir/x", cid, 5)], "nodir/x"),
    }


CASES = ["absolute", "dotdot", "inner-dotdot", "nul", "empty", "through-symlink",
         "dir-through-symlink", "hardlink-outside", "hardlink-dotdot", "hardlink-via-symlink",
         "hardlink-forward", "duplicate", "no-parent"]


@pytest.mark.parametrize("case", CASES)
def test_materialise_refuses_an_escaping_manifest_and_writes_nothing_outside(
        tmp_path: Path, outside: Path, case: str) -> None:
    before = listing(outside)
    with PackStore(tmp_path / "store") as packs:
        cid = packs.put(b"owned").hex()
        entries, named = bad_manifests(outside, cid)[case]
        dest = tmp_path / "dest"
        with pytest.raises(InvalidRequest) as info:
            materialize(Manifest(entries), packs, dest)
        assert named in info.value.message, info.value.message
    assert listing(outside) == before
    assert os.stat(outside / "secret").st_nlink == 1  # no hard link to it was made
    assert not dest.exists() or list(dest.iterdir()) == []  # refused before anything


@pytest.mark.parametrize("case", CASES)
def test_a_stored_tampered_manifest_is_refused_when_materialised(
        tmp_path: Path, outside: Path, case: str) -> None:
    """An old or tampered manifest already in the store: no import check ran on it."""
    before = listing(outside)
    store = ImageStore(tmp_path / "store")
    try:
        cid = store.packs.put(b"owned").hex()
        entries, named = bad_manifests(outside, cid)[case]
        store.packs.set_ref(PREFIX + "old", store.packs.put(Manifest(entries).to_json()))
        with pytest.raises(InvalidRequest) as info:
            store.materialize("old", tmp_path / "dest")
        assert named in info.value.message
    finally:
        store.close()
    assert listing(outside) == before


@pytest.mark.parametrize("case", CASES)
def test_put_manifest_refuses_an_escaping_manifest(tmp_path: Path, outside: Path,
                                                   case: str) -> None:
    store = ImageStore(tmp_path / "store")
    try:
        cid = store.packs.put(b"owned").hex()
        entries, named = bad_manifests(outside, cid)[case]
        with pytest.raises(InvalidRequest) as info:
            store.put_manifest("bad", Manifest(entries))
        assert named in info.value.message
        assert store.names() == []
    finally:
        store.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ImageStore, str]]:
    with served_store(tmp_path / "server-store") as pair:
        yield pair


@pytest.mark.parametrize("case", CASES)
def test_an_escaping_manifest_pushed_over_http_is_refused_by_name(
        served: tuple[ImageStore, str], outside: Path, case: str) -> None:
    store, url = served
    cid = store.packs.put(b"owned").hex()
    entries, named = bad_manifests(outside, cid)[case]
    with httpx.Client(base_url=url) as c:
        resp = c.put("/v1/images/bad", content=Manifest(entries).to_json())
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["code"] == "invalid_request" and named in err["message"], err
    assert store.names(shelves=True) == []


def test_a_malformed_manifest_is_a_clear_refusal_not_a_crash(
        served: tuple[ImageStore, str]) -> None:
    _, url = served
    bodies = [b"not json", b"[]", b'{"version": 1, "entries": {}}',
              b'{"version": 1, "entries": [{"path": "x"}]}',
              b'{"version": 1, "entries": [{"path": "x", "kind": "f", "mode": "rw",'
              b' "uid": 0, "gid": 0, "mtime_ns": 0}]}',
              b'{"version": 1, "entries": [{"path": "x", "kind": "f", "mode": 420, "uid": 0,'
              b' "gid": 0, "mtime_ns": 0, "size": 1, "extents": [[0, ["zz"]]]}]}',
              b'{"version": 1, "entries": [{"path": "x", "kind": "q", "mode": 420, "uid": 0,'
              b' "gid": 0, "mtime_ns": 0}]}']
    with httpx.Client(base_url=url) as c:
        for body in bodies:
            resp = c.put("/v1/images/bad", content=body)
            assert resp.status_code == 422, (body, resp.text)
            assert resp.json()["error"]["code"] == "invalid_request"


def test_an_agent_refuses_a_tampered_manifest_it_fetches(served: tuple[ImageStore, str],
                                                         tmp_path: Path, outside: Path) -> None:
    """The client side (an agent's cache) checks what the server sends, not only the server."""
    store, url = served
    cid = store.packs.put(b"owned").hex()
    entries, _ = bad_manifests(outside, cid)["through-symlink"]
    store.packs.set_ref(PREFIX + "tampered", store.packs.put(Manifest(entries).to_json()))
    before = listing(outside)
    with PackStore(tmp_path / "cache") as cache, Client(url, "") as c, \
            pytest.raises(InvalidRequest, match="esc/planted"):
        materialize_image(c, cache, "tampered", tmp_path / "dest")
    assert listing(outside) == before


def test_symlinks_may_point_anywhere_and_are_never_written_through(tmp_path: Path,
                                                                   outside: Path) -> None:
    """A rootfs symlink to /etc/passwd is normal: it is made as a link, and neither its
    owner, its times nor its xattrs are applied to what it points at."""
    before = os.stat(outside / "secret")
    with PackStore(tmp_path / "store") as packs:
        cid = packs.put(b"hello").hex()
        entries = [d("."), d("etc"), link("etc/passwd-link", "/etc/passwd"),
                   link("host", str(outside / "secret")), link("up", "../../.."),
                   f("etc/motd", cid, 5), link("etc/motd-hard", "etc/motd", "h")]
        entries[3].mtime_ns = 5
        entries[3].xattrs = {"user.x": "eA=="}
        out = tmp_path / "out"
        materialize(Manifest(entries), packs, out)
    assert os.readlink(out / "etc" / "passwd-link") == "/etc/passwd"
    assert os.readlink(out / "host") == str(outside / "secret")
    assert os.readlink(out / "up") == "../../.."
    assert (out / "etc" / "motd").read_bytes() == b"hello"
    assert os.stat(out / "etc" / "motd-hard").st_ino == os.stat(out / "etc" / "motd").st_ino
    after = os.stat(outside / "secret")
    assert (after.st_mtime_ns, after.st_mode) == (before.st_mtime_ns, before.st_mode)
    assert os.listxattr(outside / "secret") == []


def test_a_real_tree_still_passes_the_checks_over_http(served: tuple[ImageStore, str],
                                                       tmp_path: Path) -> None:
    _, url = served
    root = tmp_path / "tree"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "file").write_bytes(os.urandom(100_000))
    os.link(root / "a" / "b" / "file", root / "hard")
    os.symlink("/etc/passwd", root / "a" / "passwd")
    os.symlink("..", root / "a" / "b" / "up")
    with PackStore(tmp_path / "cache") as cache, Client(url, "") as c:
        push_tree(c, cache, root, "real")
        out = tmp_path / "out"
        materialize_image(c, cache, "real", out)
    assert (out / "a" / "b" / "file").read_bytes() == (root / "a" / "b" / "file").read_bytes()
    assert os.readlink(out / "a" / "passwd") == "/etc/passwd"
    assert os.stat(out / "hard").st_nlink == 2
