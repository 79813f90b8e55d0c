"""Pack store: round trip, dedup, torn tails, flipped bytes, kill -9 while writing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corral.images.packstore import HEADER, CorruptChunk, MissingChunk, PackStore, chunk_id


def blobs(n: int, size: int = 4096, seed: int = 0) -> list[bytes]:
    return [(b"%d-%d:" % (seed, i)) * (size // 8) for i in range(n)]


def test_round_trip_and_dedup(tmp_path: Path) -> None:
    with PackStore(tmp_path) as store:
        data = blobs(50)
        ids = store.put_many(data + data[:10])
        assert len(store) == 50
        assert ids[50:] == ids[:10]
        assert all(store.get(i) == d for i, d in zip(ids, data, strict=False))
        size = store._pack_path(0).stat().st_size
        store.put_many(data)  # nothing new: the pack must not grow
        assert store._pack_path(0).stat().st_size == size
    with PackStore(tmp_path) as again:
        assert len(again) == 50 and again.get(ids[7]) == data[7]
        with pytest.raises(MissingChunk):
            again.get(chunk_id(b"never stored"))


def test_unindexed_complete_records_are_recovered_and_torn_tail_cut(tmp_path: Path) -> None:
    with PackStore(tmp_path) as store:
        store.put_many(blobs(5))
    pack = tmp_path / "packs" / "pack-00000000.dat"
    committed = pack.stat().st_size
    # Simulate a crash after fsync of two more records but before the index commit, plus a torn
    # third record: write them with a second store whose index we then throw away.
    other = tmp_path / "other"
    with PackStore(other) as scratch:
        scratch.put_many(blobs(2, seed=1))
        tail = scratch._pack_path(0).read_bytes()
    with pack.open("ab") as fh:
        fh.write(tail)
        fh.write(tail[: HEADER.size + 10])  # torn
    with PackStore(tmp_path) as store:
        assert len(store) == 7
        for d in blobs(2, seed=1):
            assert store.get(chunk_id(d)) == d
        assert pack.stat().st_size == committed + len(tail)
        store.put_many(blobs(1, seed=2))  # appends after the cut, still readable
        assert store.get(chunk_id(blobs(1, seed=2)[0])) == blobs(1, seed=2)[0]
        assert store.verify() == []


def test_flipped_byte_is_detected_and_reported(tmp_path: Path) -> None:
    with PackStore(tmp_path) as store:
        ids = store.put_many(blobs(20))
        loc = store.locate(ids[3])
        assert loc is not None
    pack = tmp_path / "packs" / "pack-00000000.dat"
    raw = bytearray(pack.read_bytes())
    raw[loc.offset + loc.comp_len // 2] ^= 0x40
    pack.write_bytes(bytes(raw))
    with PackStore(tmp_path) as store:
        with pytest.raises(CorruptChunk) as err:
            store.get(ids[3])
        assert ids[3].hex() in err.value.message
        damage = store.verify()
        assert [d.chunk for d in damage] == [ids[3].hex()]
        assert store.get(ids[4]) == blobs(20)[4]


WRITER = """
import sys
from pathlib import Path
from corral.images.packstore import PackStore
store = PackStore(Path(sys.argv[1]))
i = 0
while True:
    store.put_many([(b"k%d:" % (i * 100 + j)) * 1024 for j in range(100)])
    i += 1
    print(i, flush=True)
"""


@pytest.mark.parametrize("delay", [0.3, 0.7, 1.1])
def test_kill_9_while_writing_leaves_a_consistent_store(tmp_path: Path, delay: float) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # at least one batch is durable
        assert first.strip() == "1"
        time.sleep(delay)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    with PackStore(tmp_path) as store:
        n = len(store)
        assert n >= 100
        assert store.verify() == []
        # every batch acknowledged before the kill is there
        for j in range(100):
            assert store.locate(chunk_id((b"k%d:" % j) * 1024)) is not None
        store.put_many(blobs(3, seed=9))
        assert len(store) == n + 3
