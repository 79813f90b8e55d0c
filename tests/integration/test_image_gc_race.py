"""``image gc`` against pushes over HTTP: chunks a push uploaded, or was told the store holds,
are never swept while that push is in flight, a name never points at a missing chunk, and a
shelved name is never replaced over HTTP.

The races are made deterministic by pausing the gc between its mark and its sweep (a wrapper
around the pack store's sweep that waits on an event), never by sleeping.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from storeserver import served_store

from corral.api.client import Client
from corral.errors import CorralError, InvalidRequest
from corral.images.packstore import PackStore, SweepResult
from corral.images.records import Record
from corral.images.store import ImageStore
from corral.images.transfer import materialize_image, push_tree
from corral.images.tree import Manifest, snapshot


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ImageStore, str]]:
    with served_store(tmp_path / "server-store") as pair:
        yield pair


def make_tree(root: Path, data: bytes) -> Path:
    (root / "lib").mkdir(parents=True)
    (root / "lib" / "data").write_bytes(data)
    (root / "conf").write_text("x = 1\n")
    return root


def digest(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def whole(store: ImageStore, name: str) -> bool:
    ids = [bytes.fromhex(c) for c in store.manifest(name).chunk_ids()]
    return all(store.packs.has_many(ids))


def upload_all(c: Client, cache: PackStore, manifest: Manifest) -> None:
    """The first half of a push: upload what the store lacks (no name yet)."""
    ids = [bytes.fromhex(i) for i in sorted(manifest.chunk_ids())]
    lacking = c.missing_chunks(ids)
    records: list[Record] = []
    for cid in lacking:
        got = cache.read_compressed(cid)
        assert got is not None
        records.append((cid, got[0], got[1]))
    if records:
        c.upload_chunks(records)


class PausedGc:
    """Runs ``store.gc`` in a thread that stops after its mark phase until :meth:`resume`."""

    def __init__(self, store: ImageStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.marked, self.go = threading.Event(), threading.Event()
        self.result: list[SweepResult] = []
        self.error: list[BaseException] = []
        real = store.packs.sweep

        def paused(*args: Any, **kwargs: Any) -> SweepResult:
            self.marked.set()
            assert self.go.wait(60), "the test never resumed the gc"
            return real(*args, **kwargs)

        monkeypatch.setattr(store.packs, "sweep", paused)

        def run() -> None:
            try:
                self.result.append(store.gc(min_dead_ratio=0.0))
            except BaseException as exc:  # reported to the test
                self.error.append(exc)

        self.thread = threading.Thread(target=run, daemon=True)

    def __enter__(self) -> PausedGc:
        self.thread.start()
        assert self.marked.wait(60), f"gc never reached its sweep: {self.error}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.go.set()
        self.thread.join(60)
        assert not self.thread.is_alive()

    def resume(self) -> SweepResult:
        self.__exit__()
        assert not self.error, self.error
        return self.result[0]


def test_a_manifest_named_between_mark_and_sweep_keeps_its_chunks(
        served: tuple[ImageStore, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's race: the chunks were uploaded before gc began, the name landed while gc
    was between its mark and its sweep. The old store swept them: a name over a hole."""
    store, url = served
    src = make_tree(tmp_path / "src", os.urandom(600_000))
    with PackStore(tmp_path / "cache") as cache, Client(url, "") as c:
        m = snapshot(src, cache)
        upload_all(c, cache, m)
        store.packs.seal()
        with PausedGc(store, monkeypatch) as gc:
            c.put_manifest("@shelf-web-1", m.to_json())
            gc.resume()
        assert whole(store, "@shelf-web-1")
        assert store.packs.verify() == []
        out = tmp_path / "out"
        with PackStore(tmp_path / "fresh") as fresh:
            materialize_image(c, fresh, "@shelf-web-1", out)
        assert digest(out) == digest(src)


def test_chunks_uploaded_while_gc_marks_are_kept(served: tuple[ImageStore, str],
                                                 tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    store, url = served
    src = make_tree(tmp_path / "src", os.urandom(400_000))
    with PackStore(tmp_path / "cache") as cache, Client(url, "") as c:
        m = snapshot(src, cache)
        with PausedGc(store, monkeypatch) as gc:
            upload_all(c, cache, m)
            gc.resume()
        c.put_manifest("late", m.to_json())  # the name comes after the whole gc
        assert whole(store, "late")


def test_a_push_in_flight_across_a_whole_gc_is_never_swept(served: tuple[ImageStore, str],
                                                           tmp_path: Path) -> None:
    """Chunks uploaded (and chunks the store said it had) before a gc, named after it: the
    push is in flight for the whole gc, which leaves its chunks alone."""
    store, url = served
    shared = os.urandom(500_000)
    old = make_tree(tmp_path / "old", shared)
    store.import_tree("old", old)
    store.remove("old")  # its chunks are garbage now...
    new = make_tree(tmp_path / "new", shared + os.urandom(200_000))
    with PackStore(tmp_path / "cache") as cache, Client(url, "") as c:
        m = snapshot(new, cache)
        ids = [bytes.fromhex(i) for i in m.chunk_ids()]
        lacking = c.missing_chunks(ids)
        assert 0 < len(lacking) < len(ids)  # ...but the push was told the store has them
        upload_all(c, cache, m)
        store.packs.seal()
        store.gc(min_dead_ratio=0.0)
        c.put_manifest("new", m.to_json())
        assert whole(store, "new")
        out = tmp_path / "out"
        with PackStore(tmp_path / "fresh") as fresh:
            materialize_image(c, fresh, "new", out)
        assert digest(out) == digest(new)


def test_garbage_still_goes_at_the_first_gc(served: tuple[ImageStore, str],
                                            tmp_path: Path) -> None:
    """Protecting pushes in flight keeps nothing of a push that finished: an image pushed,
    named and removed is collected by the next gc."""
    store, url = served
    src = make_tree(tmp_path / "src", os.urandom(600_000))
    with PackStore(tmp_path / "cache") as cache, Client(url, "") as c:
        push_tree(c, cache, src, "gone")
        c.image_remove("gone")
    chunks = len(store.packs)
    store.packs.seal()
    res = store.gc(min_dead_ratio=0.0)
    assert res.dropped == chunks and len(store.packs) == 0


def test_a_refused_push_keeps_nothing_from_the_next_gc(served: tuple[ImageStore, str],
                                                       tmp_path: Path) -> None:
    """A push refused when it names its tree (the name is taken) is over: what it asked about
    is not kept for it (``corral image import`` of a taken name, then rm and gc)."""
    store, url = served
    src = make_tree(tmp_path / "src", os.urandom(300_000))
    with PackStore(tmp_path / "cache") as cache, Client(url, "") as c:
        push_tree(c, cache, src, "taken")
        with pytest.raises(CorralError, match="exists"):
            push_tree(c, cache, src, "taken")
        c.image_remove("taken")
    chunks = len(store.packs)
    store.packs.seal()
    assert store.gc(min_dead_ratio=0.0).dropped == chunks
    assert store.packs.touched() == {}


def test_a_name_whose_chunks_a_gc_took_is_refused_then_the_push_retries(
        served: tuple[ImageStore, str], tmp_path: Path) -> None:
    """A push that outlives two gcs may lose its chunks; the name is then refused (never a
    name over a hole) and ``push_tree`` uploads what is missing again."""
    store, url = served
    src = make_tree(tmp_path / "src", os.urandom(600_000))

    class GcBeforeNaming:
        """The client, with two whole gcs run just before the first naming."""

        def __init__(self, c: Client) -> None:
            self.c, self.names = c, 0

        def __getattr__(self, attr: str) -> Callable[..., Any]:
            return getattr(self.c, attr)  # type: ignore[no-any-return]

        def put_manifest(self, name: str, manifest: bytes, replace: bool = False) -> Any:
            self.names += 1
            if self.names == 1:
                for _ in range(2):
                    store.packs.seal()
                    store.gc(min_dead_ratio=0.0)
            return self.c.put_manifest(name, manifest, replace=replace)

    with PackStore(tmp_path / "cache") as cache, Client(url, "") as c:
        wrapped = GcBeforeNaming(c)
        push_tree(wrapped, cache, src, "slow")
        assert wrapped.names == 2
        assert whole(store, "slow")


def test_a_shelf_is_never_replaced_over_http(served: tuple[ImageStore, str],
                                             tmp_path: Path) -> None:
    store, url = served
    src = make_tree(tmp_path / "src", os.urandom(100_000))
    other = make_tree(tmp_path / "other", os.urandom(100_000))
    with PackStore(tmp_path / "cache") as cache, Client(url, "") as c:
        push_tree(c, cache, src, "@shelf-db-0a1b2c3d")  # agents name shelves over HTTP
        before = store.packs.get_ref("image:@shelf-db-0a1b2c3d")
        with pytest.raises(InvalidRequest, match="shelve"):
            push_tree(c, cache, other, "@shelf-db-0a1b2c3d", replace=True)
        with httpx.Client(base_url=url) as h:
            resp = h.put("/v1/images/@shelf-db-0a1b2c3d", params={"replace": "true"},
                         content=snapshot(other, cache).to_json())
        assert resp.status_code == 422, resp.text
        assert store.packs.get_ref("image:@shelf-db-0a1b2c3d") == before
        # the server's own shelve, in-process, still may
        store.put_manifest("@shelf-db-0a1b2c3d", Manifest([]), replace=True)
        assert store.manifest("@shelf-db-0a1b2c3d").entries == []


def test_ordinary_images_may_still_be_replaced(served: tuple[ImageStore, str],
                                               tmp_path: Path) -> None:
    _, url = served
    with PackStore(tmp_path / "cache") as cache, Client(url, "") as c:
        push_tree(c, cache, make_tree(tmp_path / "a", os.urandom(1000)), "img")
        push_tree(c, cache, make_tree(tmp_path / "b", os.urandom(1000)), "img", replace=True)
        with pytest.raises(CorralError, match="exists"):
            push_tree(c, cache, make_tree(tmp_path / "c", os.urandom(1000)), "img")
