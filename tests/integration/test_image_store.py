"""Named images: dedup figures, gc that frees only garbage, crash during gc, tarball import."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corral.images.packstore import PackStore
from corral.images.store import ImageStore


def make_tree(root: Path, seed: int, shared: bytes) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "base").write_bytes(shared)
    (root / "own").write_bytes(os.urandom(200_000) + bytes([seed]))
    return root


def digest(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_dedup_figures_and_gc(tmp_path: Path) -> None:
    shared = os.urandom(1_000_000)
    a = make_tree(tmp_path / "a", 1, shared)
    b = make_tree(tmp_path / "b", 2, shared)
    store = ImageStore(tmp_path / "store")
    try:
        store.import_tree("a", a)
        store.import_tree("b", b)
        info = {i.name: i for i in store.list()}
        assert info["a"].size == 1_200_001
        assert 190_000 < info["a"].unique_size < 260_000  # only its own file (+ edge chunk)
        store.packs.seal()
        before = len(store.packs)
        store.remove("a")
        result = store.gc(min_dead_ratio=0.0)
        assert result.dropped >= 2  # a's own chunks and its manifest
        assert result.packs_rewritten >= 1 and result.bytes_freed > 150_000
        assert len(store.packs) == before - result.dropped
        out = tmp_path / "out"
        store.materialize("b", out)
        assert digest(out) == digest(b)
        assert store.packs.verify() == []
    finally:
        store.close()


def test_tarball_import(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", 3, b"x" * 5000)
    tarball = tmp_path / "img.tar.gz"
    subprocess.run(["tar", "-czf", str(tarball), "-C", str(src), "."], check=True)
    store = ImageStore(tmp_path / "store")
    try:
        store.import_tree("t", tarball)
        out = tmp_path / "out"
        store.materialize("t", out)
        assert digest(out) == digest(src)
    finally:
        store.close()


GC_LOOP = """
import sys
from pathlib import Path
from corral.images.store import ImageStore
store = ImageStore(Path(sys.argv[1]))
print("ready", flush=True)
while True:
    store.packs.seal()
    store.gc(min_dead_ratio=0.0)
"""


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.5])
def test_kill_9_during_gc_keeps_every_live_image(tmp_path: Path, delay: float) -> None:
    store = ImageStore(tmp_path / "store")
    trees = {}
    for i in range(4):
        trees[f"i{i}"] = make_tree(tmp_path / f"t{i}", i, os.urandom(300_000))
        store.import_tree(f"i{i}", trees[f"i{i}"])
    store.remove("i0")
    store.remove("i2")
    store.close()
    proc = subprocess.Popen([sys.executable, "-c", GC_LOOP, str(tmp_path / "store")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    store = ImageStore(tmp_path / "store")
    try:
        assert store.names() == ["i1", "i3"]
        assert store.packs.verify() == []
        for name in ("i1", "i3"):
            out = tmp_path / f"out-{name}"
            store.materialize(name, out)
            assert digest(out) == digest(trees[name])
        store.gc(min_dead_ratio=0.0)
        assert {p.name for p in (tmp_path / "store" / "packs").iterdir()}  # still has packs
    finally:
        store.close()


def test_import_racing_gc_stays_whole(tmp_path: Path) -> None:
    """An import that dedups against chunks of a removed image while gc runs keeps them."""
    import threading

    shared = os.urandom(2_000_000)
    store = ImageStore(tmp_path / "store")
    try:
        store.import_tree("old", make_tree(tmp_path / "old", 1, shared))
        store.remove("old")
        store.packs.seal()
        new = make_tree(tmp_path / "new", 2, shared)
        t = threading.Thread(target=store.import_tree, args=("new", new))
        t.start()
        store.gc(min_dead_ratio=0.0)
        t.join(30)
        store.gc(min_dead_ratio=0.0)
        out = tmp_path / "out"
        store.materialize("new", out)
        assert digest(out) == digest(new)
    finally:
        store.close()


def test_packstore_reopen_after_sweep(tmp_path: Path) -> None:
    with PackStore(tmp_path) as ps:
        ids = ps.put_many([b"a" * 5000, b"b" * 5000])
        ps.seal()
        ps.sweep({ids[0]}, min_dead_ratio=0.0)
        assert ps.get(ids[0]) == b"a" * 5000
        assert ps.locate(ids[1]) is None
    with PackStore(tmp_path) as ps:
        assert ps.get(ids[0]) == b"a" * 5000 and len(ps) == 1


def test_verify_names_the_images_a_flipped_byte_breaks(tmp_path: Path) -> None:
    shared = os.urandom(600_000)
    store = ImageStore(tmp_path / "store")
    try:
        store.import_tree("a", make_tree(tmp_path / "a", 1, shared))
        store.import_tree("b", make_tree(tmp_path / "b", 2, shared))
        assert store.verify() == []
        # flip a byte in a chunk of the shared file: both images are broken by it
        base = store.manifest("a")
        entry = next(e for e in base.entries if e.path == "bin/base")
        cid = bytes.fromhex(entry.extents[0][1][0])
        loc = store.packs.locate(cid)
        assert loc is not None
        pack = store.packs.root / "packs" / f"pack-{loc.pack:08d}.dat"
        raw = bytearray(pack.read_bytes())
        raw[loc.offset + 3] ^= 0x01
        pack.write_bytes(bytes(raw))
        damage = store.verify()
        assert [d["chunk"] for d in damage] == [cid.hex()]
        assert damage[0]["images"] == ["a", "b"]
    finally:
        store.close()


IMPORT_LOOP = """
import sys
from pathlib import Path
from corral.images.store import ImageStore
store = ImageStore(Path(sys.argv[1]))
print("ready", flush=True)
store.import_tree("big", Path(sys.argv[2]))
print("done", flush=True)
"""


@pytest.mark.parametrize("delay", [0.1, 0.3, 0.6])
def test_kill_9_during_import_leaves_no_half_image(tmp_path: Path, delay: float) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"f{i}").write_bytes(os.urandom(500_000))
    store = ImageStore(tmp_path / "store")
    store.import_tree("keep", make_tree(tmp_path / "k", 9, os.urandom(100_000)))
    store.close()
    proc = subprocess.Popen([sys.executable, "-c", IMPORT_LOOP, str(tmp_path / "store"),
                             str(src)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    store = ImageStore(tmp_path / "store")
    try:
        names = store.names()
        assert "keep" in names
        if "big" in names:  # finished before the kill: then it is whole
            out = tmp_path / "out"
            store.materialize("big", out)
            assert digest(out) == digest(src)
        assert store.packs.verify() == []
        store.gc(min_dead_ratio=0.0)  # the orphaned chunks of the killed import go
        assert store.packs.verify() == []
        out = tmp_path / "keep-out"
        store.materialize("keep", out)
    finally:
        store.close()
