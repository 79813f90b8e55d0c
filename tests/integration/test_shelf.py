"""The agent's shelf calls against a real image store served over HTTP on loopback: two hosts'
agent states (real disks, real chunk caches), no fleet and no bus.

What is checked is what shelving promises: a push uploads only the chunks the store lacks, a pull
fetches only the chunks the host lacks and rebuilds the tree exactly, a kept disk is used as it
is, shelved disks never show up as images and survive gc.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from storeserver import served_store

from corral.agent import shelf
from corral.agent.disks import HostDisks
from corral.agent.handlers import HANDLERS
from corral.agent.imagecache import ImageCache
from corral.agent.state import AgentState, Handler
from corral.bus.rpc import CALLS
from corral.errors import Conflict, InvalidRequest, NotFound
from corral.images.store import ImageStore

TOKEN = "shelf-token"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ImageStore, str]]:
    with served_store(tmp_path / "server-store", ()) as pair:
        yield pair


def agent(root: Path, url: str) -> AgentState:
    st = AgentState(root, {}, 5.0)
    st.disks = HostDisks(root / "disks", "dir", root, "h1")
    st.images = ImageCache(root, st.store.root, TOKEN)
    st.images.api_url = url
    return st


def close(*states: AgentState) -> None:
    for st in states:
        assert st.images is not None
        st.images.close()


def tree(root: Path, base: bytes, own: bytes) -> None:
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "usr" / "lib" / "base.so").write_bytes(base)
    (root / "data").mkdir()
    (root / "data" / "own.db").write_bytes(own)
    (root / "data" / "conf").write_text("port = 8080\n")
    (root / "data" / "conf").chmod(0o640)
    os.symlink("data/conf", root / "conf")
    os.link(root / "data" / "own.db", root / "data" / "own-link.db")


def described(root: Path) -> dict[str, tuple[int, bytes, int]]:
    """Path -> (mode, content or link target, link count): what a round trip must keep."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        body = os.readlink(p).encode() if p.is_symlink() else (
            p.read_bytes() if p.is_file() else b"")
        out[str(p.relative_to(root))] = (stat.S_IMODE(st.st_mode), body, st.st_nlink)
    return out


def call(fn: Handler, st: AgentState, **args: object) -> dict[str, object]:
    """A handler called as the dispatcher calls it: its call's argument model in, the
    result as it goes on the wire out."""
    verb = next(v for v, h in HANDLERS.items() if h is fn)
    result = asyncio.run(fn(st, CALLS[verb].args.model_validate(args)))
    return dict(CALLS[verb].dump(result))


def test_push_then_pull_elsewhere_moves_each_chunk_once(served: tuple[ImageStore, str],
                                                        tmp_path: Path) -> None:
    store, url = served
    base = os.urandom(2_000_000)
    img = tmp_path / "img"
    (img / "usr" / "lib").mkdir(parents=True)
    (img / "usr" / "lib" / "base.so").write_bytes(base)
    store.import_tree("base", img)
    a, b = agent(tmp_path / "a", url), agent(tmp_path / "b", url)
    try:
        assert a.disks is not None and b.disks is not None
        for n, own in (("web", os.urandom(300_000)), ("db", os.urandom(200_000))):
            fill = a.disks.new_dir(n)
            tree(fill, base, own)
            a.disks.publish(n, fill)

        pushed = call(shelf.disk_push, a, name="web", image="@shelf-web-1")
        assert 0 < int(pushed["uploaded_bytes"]) < 600_000  # the base was in the store already
        call(shelf.disk_push, a, name="db", image="@shelf-db-1")
        with pytest.raises(NotFound):
            call(shelf.disk_push, a, name="ghost", image="@shelf-ghost-1")

        # the store: shelves are not images, survive gc, and cannot be removed as images
        assert store.names() == ["base"]
        assert store.names(shelves=True) == ["@shelf-db-1", "@shelf-web-1", "base"]
        with pytest.raises(InvalidRequest):
            store.remove("@shelf-web-1")
        store.remove("base")
        store.gc(min_dead_ratio=0.0)
        info = store.shelf_info("@shelf-web-1")
        assert info.size >= 2_300_000 and info.unique_size == info.stored_size  # no image left

        # placement's question: how much of a shelf does each host hold?
        ids = sorted(store.manifest("@shelf-web-1").chunk_ids())
        assert call(shelf.chunks_cached, a, ids=ids) == {"have": len(ids), "of": len(ids)}
        assert call(shelf.chunks_cached, b, ids=ids) == {"have": 0, "of": len(ids)}

        # host b: the first pull fetches everything, the second only what differs
        first = call(shelf.disk_pull, b, name="web", image="@shelf-web-1")
        assert first["fetched_chunks"] == len(ids) and first["existing"] is False
        assert described(b.disks.path("web")) == described(a.disks.path("web"))
        second = call(shelf.disk_pull, b, name="db", image="@shelf-db-1")
        assert 0 < int(second["fetched_bytes"]) < 400_000  # base.so came with web
        assert described(b.disks.path("db")) == described(a.disks.path("db"))

        # a kept disk is used as it is, unless it is an old copy to replace
        (b.disks.path("web") / "data" / "conf").write_text("changed\n")
        kept = call(shelf.disk_pull, b, name="web", image="@shelf-web-1")
        assert kept["existing"] is True and kept["fetched_chunks"] == 0
        assert (b.disks.path("web") / "data" / "conf").read_text() == "changed\n"
        rebuilt = call(shelf.disk_pull, b, name="web", image="@shelf-web-1", replace=True)
        assert rebuilt["existing"] is False and rebuilt["fetched_chunks"] == 0  # cached
        assert described(b.disks.path("web")) == described(a.disks.path("web"))

        assert call(shelf.disk_drop, b, name="web") == {"dropped": True}
        assert call(shelf.disk_drop, b, name="web") == {"dropped": False}  # idempotent
        assert not b.disks.exists("web")
    finally:
        close(a, b)


def test_pull_and_drop_refuse_a_disk_an_instance_uses(served: tuple[ImageStore, str],
                                                      tmp_path: Path) -> None:
    from corral.agent.store import InstanceRecord
    from corral.bus.messages import WireSpec
    from corral.drivers.base import Handle

    _, url = served
    st = agent(tmp_path / "h", url)
    try:
        assert st.disks is not None
        st.disks.publish("app", st.disks.new_dir("app"))
        spec = WireSpec(name="app", driver="process", command=["true"], cpus=0.1,
                        memory_bytes=1 << 20, epoch=1)
        st.records["app"] = InstanceRecord(spec=spec, handle=Handle(driver="process",
                                                                    name="app", data={}))
        with pytest.raises(Conflict):
            call(shelf.disk_drop, st, name="app")
        with pytest.raises(Conflict):
            call(shelf.disk_pull, st, name="app", image="@shelf-app-1", replace=True)
        assert st.disks.exists("app")
    finally:
        close(st)
