"""The pack store's index layout 2: ids keyed by a prefix that is never trusted alone (prefixes
shared by many chunks, an id crafted to share one), a layout-1 store converted on open, a newer
layout refused with an explanation, the index's size per chunk; and its entries written in
large batches: readers see them before they are written, a crash loses none (not even in packs
the index never heard of), a reader racing a flush never misses one."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import lmdb
import pytest

from corral.errors import ConfigError
from corral.images import packstore
from corral.images.packstore import (
    KEY_LEN,
    LOC,
    OLD_MARKER,
    PackStore,
    chunk_id,
    decode_location,
    encode_location,
)


def blobs(n: int, seed: int = 0, size: int = 3000) -> list[bytes]:
    return [(b"%d-%d:" % (seed, i)) * (size // 6) for i in range(n)]


@pytest.mark.parametrize("loc", [(0, 0, 1, 1), (255, 2**32 - 1, 2**16 - 1, 2**16 - 1),
                                 (256, 5, 10, 10), (3, 7, 2**16, 10), (70_000, 1, 1, 2**16),
                                 (2**32 - 1, 2**40, 2**31, 2**31)])
def test_locations_round_trip_in_every_encoding(loc: tuple[int, int, int, int]) -> None:
    assert tuple(vars(decode_location(encode_location(*loc))).values()) == loc


def test_chunks_sharing_a_prefix_are_told_apart_by_their_headers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packstore, "KEY_LEN", 1)  # 300 chunks on at most 256 keys
    data = blobs(300)
    with PackStore(tmp_path, generations=True) as store:
        ids = store.put_many(data)
        assert len(store) == 300
        assert all(store.get(i) == d for i, d in zip(ids, data, strict=True))
        assert store.has_many(ids) == [True] * 300
        stranger = [bytes([i[0]]) + os.urandom(31) for i in ids[:20]]
        assert store.has_many(stranger) == [False] * 20
        assert store.present(stranger) == [False] * 20
        assert store.name_if_whole("n", ids[0], stranger[:2]).missing == stranger[:2]
        store.seal()
        res = store.sweep(set(ids[::2]), min_dead_ratio=0.0)
        assert res.dropped == 150 and res.damaged == []
        assert sorted(c for c, _ in store) == sorted(ids[::2])
    with PackStore(tmp_path) as store:
        assert len(store) == 150 and store.verify() == []
        assert all(store.get(i) == d for i, d in zip(ids[::2], data[::2], strict=True))
        assert store.has_many(ids[1::2]) == [False] * 150


def test_an_id_crafted_to_share_a_prefix_is_not_present(tmp_path: Path) -> None:
    with PackStore(tmp_path, generations=True) as store:
        (cid,) = store.put_many([b"the real chunk" * 100])
        forged = cid[:KEY_LEN] + bytes(32 - KEY_LEN)
        assert store.has_many([forged]) == [False]
        assert store.present([forged]) == [False]
        assert store.locate(forged) is None and store.read_compressed(forged) is None
        with pytest.raises(packstore.MissingChunk):
            store.get(forged)


def test_a_layout_1_store_is_converted_when_opened(tmp_path: Path) -> None:
    data = blobs(40)
    with PackStore(tmp_path) as store:
        ids = store.put_many(data)
        locs = [store.locate(i) for i in ids]
        store.set_ref("image:x", ids[0])
    # rewrite the index as layout 1 wrote it: whole ids to LOC, no layout mark
    env = lmdb.open(str(tmp_path / "index"), max_dbs=8, subdir=True)
    meta, new = env.open_db(b"meta"), env.open_db(b"ids", dupsort=True)
    old = env.open_db(b"chunks")
    with env.begin(write=True) as txn:
        txn.drop(new, delete=True)
        txn.delete(b"layout", db=meta)
        for cid, loc in zip(ids, locs, strict=True):
            assert loc is not None
            txn.put(cid, LOC.pack(loc.pack, loc.offset, loc.comp_len, loc.raw_len), db=old)
    env.close()
    with PackStore(tmp_path) as store:
        assert len(store) == 40 and store.verify() == []
        assert all(store.get(i) == d for i, d in zip(ids, data, strict=True))
        assert store.get_ref("image:x") == ids[0]
        more = store.put_many(blobs(5, seed=1))
        assert store.has_many(more) == [True] * 5
    env = lmdb.open(str(tmp_path / "index"), max_dbs=8, subdir=True)
    with env.begin() as txn:  # an older corral finds a value it cannot unpack, not an index
        assert list(txn.cursor(db=env.open_db(b"chunks", txn=txn))) == [OLD_MARKER]
    env.close()
    with PackStore(tmp_path) as store:  # converted once: opening again changes nothing
        assert len(store) == 45


def test_a_newer_layout_is_refused_with_an_explanation(tmp_path: Path) -> None:
    with PackStore(tmp_path) as store:
        store.put_many(blobs(3))
    env = lmdb.open(str(tmp_path / "index"), max_dbs=8, subdir=True)
    with env.begin(write=True) as txn:
        txn.put(b"layout", b"99", db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(ConfigError) as err:
        PackStore(tmp_path)
    assert "layout 99" in err.value.message and "newer" in err.value.hint


def test_the_index_stays_under_40_bytes_per_chunk(tmp_path: Path) -> None:
    """USERS.md §6's scale: a small, dense index is what keeps PUTs fast as the store fills."""
    with PackStore(tmp_path) as store:
        for _ in range(20):
            store.put_many([os.urandom(64) for _i in range(1000)])
        st = store.index_stat()
    assert st["entries"] == 20_000
    assert st["pages"] * st["page_size"] / st["entries"] <= 40


def test_a_crash_before_the_index_is_written_loses_no_acknowledged_chunk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packstore, "PACK_LIMIT", 20_000)  # several packs the index never saw
    store = PackStore(tmp_path, generations=True)
    acked = []
    for _ in range(12):
        data = [os.urandom(3000) for _i in range(10)]  # incompressible: 30 kB a batch
        store.put_many(data)
        acked += data
    assert len(store._pending) == 120 and store._tail[0] >= 3
    for fd in store._read_fds.values():  # the process dies: nothing is flushed
        os.close(fd)
    store._env.close()
    with PackStore(tmp_path) as again:
        assert len(again) == 120 and again.verify() == []
        assert all(again.get(chunk_id(d)) == d for d in acked)
        (more,) = again.put_many([b"after the crash" * 300])
        assert again.locate(more) is not None and again.locate(more).pack >= 3  # type: ignore[union-attr]
    with PackStore(tmp_path) as third:
        assert len(third) == 121


def test_entries_are_written_flush_at_a_time(tmp_path: Path) -> None:
    with PackStore(tmp_path, flush_at=100) as store:
        ids = store.put_many(blobs(250))
        assert len(store._pending) < 100 and len(store) == 250
        assert store.has_many(ids) == [True] * 250
    with PackStore(tmp_path, flush_at=1) as store:  # every write, as layout 1 did
        store.put_many(blobs(5, seed=1))
        assert store._pending == {} and len(store) == 255


def test_a_reader_racing_flushes_never_misses_an_acknowledged_chunk(tmp_path: Path) -> None:
    acked: list[bytes] = []
    done = threading.Event()
    misses = []
    with PackStore(tmp_path, flush_at=30) as store:

        def read() -> None:
            while not done.is_set():
                seen = list(acked)
                if not all(store.has_many(seen)):
                    misses.append(len(seen))

        reader = threading.Thread(target=read)
        reader.start()
        try:
            for b in range(60):
                acked.extend(store.put_many(blobs(7, seed=100 + b, size=600)))
        finally:
            done.set()
            reader.join(10)
    assert misses == []
