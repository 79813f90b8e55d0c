"""Agents fetch only the chunks they lack, over real HTTP on loopback, verified on receipt."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import Depends, Header, HTTPException
from storeserver import served_store

from corral.api.client import Client
from corral.images.packstore import CorruptChunk, PackStore
from corral.images.store import ImageStore
from corral.images.transfer import materialize_image

TOKEN = "img-token"


def need_token(authorization: str = Header(default="")) -> None:
    if authorization != f"Bearer {TOKEN}":
        raise HTTPException(401)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ImageStore, str]]:
    with served_store(tmp_path / "server-store", [Depends(need_token)]) as pair:
        yield pair


def tree(root: Path, shared: bytes, own: bytes) -> Path:
    (root / "usr").mkdir(parents=True)
    (root / "usr" / "base").write_bytes(shared)
    (root / "app").write_bytes(own)
    return root


def digest(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_second_image_moves_only_its_own_chunks(served: tuple[ImageStore, str],
                                                tmp_path: Path) -> None:
    store, url = served
    shared = os.urandom(3_000_000)
    a = tree(tmp_path / "a", shared, os.urandom(100_000))
    b = tree(tmp_path / "b", shared, os.urandom(100_000))
    store.import_tree("a", a)
    store.import_tree("b", b)
    cache = PackStore(tmp_path / "agent-cache")
    try:
        with Client(url, TOKEN) as c:
            first = materialize_image(c, cache, "a", tmp_path / "out-a")
            second = materialize_image(c, cache, "b", tmp_path / "out-b")
            again = materialize_image(c, cache, "a", tmp_path / "out-a2")
        assert digest(tmp_path / "out-a") == digest(a)
        assert digest(tmp_path / "out-b") == digest(b)
        assert first.bytes > 3_000_000
        assert 0 < second.bytes < 400_000  # its own file (+ an edge chunk), not the base
        assert again.chunks == 0 and again.bytes == 0
    finally:
        cache.close()


def test_without_token_nothing_is_served(served: tuple[ImageStore, str]) -> None:
    _, url = served
    with httpx.Client(base_url=url) as c:
        assert c.get("/v1/images").status_code == 401


def test_a_corrupt_chunk_from_the_server_is_refused(served: tuple[ImageStore, str],
                                                    tmp_path: Path) -> None:
    store, url = served
    src = tree(tmp_path / "src", os.urandom(500_000), b"x")
    store.import_tree("img", src)
    # damage one data chunk (not the manifest) in the server's pack file behind its back
    manifest_id = store.packs.get_ref("image:img")
    cid, loc = next((c, lo) for c, lo in store.packs if c != manifest_id)
    pack = store.packs.root / "packs" / f"pack-{loc.pack:08d}.dat"
    raw = bytearray(pack.read_bytes())
    raw[loc.offset + 5] ^= 0xFF
    pack.write_bytes(bytes(raw))
    cache = PackStore(tmp_path / "cache")
    try:
        with Client(url, TOKEN) as c, pytest.raises(CorruptChunk):
            materialize_image(c, cache, "img", tmp_path / "out")
        assert cache.locate(cid) is None  # nothing unverified was kept
    finally:
        cache.close()


def test_push_uploads_only_what_the_server_lacks(served: tuple[ImageStore, str],
                                                 tmp_path: Path) -> None:
    from corral.images.transfer import push_tree

    store, url = served
    shared = os.urandom(2_000_000)
    base = tree(tmp_path / "base", shared, b"base")
    store.import_tree("base", base)
    disk = tree(tmp_path / "disk", shared, os.urandom(150_000))  # an instance built on base
    cache = PackStore(tmp_path / "agent")
    try:
        with Client(url, TOKEN) as c:
            up = push_tree(c, cache, disk, "shelf-web")
            assert 0 < up.bytes < 500_000  # its own data, not the 2 MB base
            again = push_tree(c, cache, disk, "shelf-web", replace=True)
            assert again.chunks == 0
        out = tmp_path / "back"
        store.materialize("shelf-web", out)
        assert digest(out) == digest(disk)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            bad = c.put("/v1/images/holes", content=b'{"version": 1, "entries": [{"path": "x",'
                        b' "kind": "f", "mode": 420, "uid": 0, "gid": 0, "mtime_ns": 0,'
                        b' "size": 3, "extents": [[0, ["' + b"ab" * 32 + b'"]]]}]}')
            assert bad.status_code == 422  # names a chunk the store does not hold
            assert "not stored" in bad.json()["error"]["message"]
    finally:
        cache.close()


def test_image_route_refusals_are_the_servers_errors(served: tuple[ImageStore, str]) -> None:
    """The image routes go through the client's one error translator, like every route."""
    from corral.errors import InvalidRequest, NotFound, Unauthorized

    _, url = served
    holes = (b'{"version": 1, "entries": [{"path": "x", "kind": "f", "mode": 420, "uid": 0,'
             b' "gid": 0, "mtime_ns": 0, "size": 3, "extents": [[0, ["' + b"ab" * 32
             + b'"]]]}]}')
    with Client(url, TOKEN) as c:
        with pytest.raises(NotFound, match="no image named 'nope'") as info:
            c.manifest("nope")
        assert info.value.hint == "see 'corral image ls'"
        with pytest.raises(InvalidRequest, match="not stored"):
            c.put_manifest("holes", holes)
        assert c.missing_chunks([b"\x01" * 32]) == [b"\x01" * 32]
    with Client(url, "wrong") as c, pytest.raises(Unauthorized):
        c.images_data()
