"""Content-addressed chunk store: zstd chunks appended to pack files, an LMDB index.

Why this shape (USERS.md §6): a store with one file per object slows down as it fills, because
every PUT and GET pays directory lookups and inode churn. Here a PUT is an append to the open pack
plus one B-tree insert, a GET is one index lookup plus one ``pread``, whatever the fill.

Crash safety without a journal of our own: records are appended and the pack is fsynced *before*
the index transaction that names them commits, and the index remembers how much of each pack it
covers. On open, anything past that mark is either a complete record whose hash checks out (it
is indexed) or a torn tail (it is cut off). So a kill -9 at any point leaves every indexed chunk
readable and no index entry pointing at garbage.

Record layout: ``MAGIC(4) | id(32) | raw_len(u32) | comp_len(u32) | payload(comp_len)``.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3
import lmdb
import zstandard

from corral.errors import CorralError

MAGIC = b"CRC1"
HEADER = struct.Struct(">4s32sII")
LOC = struct.Struct(">IQII")  # pack number, offset, comp_len, raw_len
PACK_LIMIT = 512 * 1024**2


class CorruptChunk(CorralError):
    code = "corrupt_chunk"
    http_status = 500
    exit_code = 11


class MissingChunk(CorralError):
    code = "missing_chunk"
    http_status = 404
    exit_code = 4


def chunk_id(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


@dataclass(frozen=True)
class Location:
    pack: int
    offset: int
    comp_len: int
    raw_len: int


@dataclass(frozen=True)
class Damage:
    pack: int
    offset: int
    chunk: str
    reason: str


class PackStore:
    """Thread-safe for many readers and one writer at a time (writes take a lock)."""

    def __init__(self, root: Path, *, map_size: int = 64 * 1024**3, level: int = 3) -> None:
        self.root = Path(root)
        (self.root / "packs").mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(
            str(self.root / "index"), map_size=map_size, max_dbs=3, subdir=True, sync=True
        )
        self._chunks = self._env.open_db(b"chunks")
        self._meta = self._env.open_db(b"meta")
        self._lock = threading.Lock()
        self._cctx = zstandard.ZstdCompressor(level=level)
        self._read_fds: dict[int, int] = {}
        self._recover()

    # -- packs -------------------------------------------------------------------------------
    def _pack_path(self, n: int) -> Path:
        return self.root / "packs" / f"pack-{n:08d}.dat"

    def _committed(self, txn: lmdb.Transaction, n: int) -> int:
        raw = txn.get(b"len:%d" % n, db=self._meta)
        return int(raw) if raw else 0

    def _current_pack(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(b"current", db=self._meta)
        return int(raw) if raw else 0

    def _recover(self) -> None:
        """Index complete records past each pack's committed mark; cut torn tails."""
        with self._env.begin(write=True) as txn:
            current = self._current_pack(txn)
            for n in range(current + 1):
                path = self._pack_path(n)
                if not path.exists():
                    continue
                mark = self._committed(txn, n)
                size = path.stat().st_size
                if size == mark:
                    continue
                good = mark
                with path.open("rb") as fh:
                    fh.seek(mark)
                    while True:
                        head = fh.read(HEADER.size)
                        if len(head) < HEADER.size:
                            break
                        magic, cid, raw_len, comp_len = HEADER.unpack(head)
                        payload = fh.read(comp_len)
                        if magic != MAGIC or len(payload) < comp_len:
                            break
                        try:
                            data = zstandard.ZstdDecompressor().decompress(
                                payload, max_output_size=raw_len
                            )
                        except zstandard.ZstdError:
                            break
                        if chunk_id(data) != cid:
                            break
                        loc = LOC.pack(n, good + HEADER.size, comp_len, raw_len)
                        txn.put(cid, loc, db=self._chunks, overwrite=False)
                        good += HEADER.size + comp_len
                if good < size:
                    with path.open("r+b") as fh:
                        fh.truncate(good)
                        os.fsync(fh.fileno())
                txn.put(b"len:%d" % n, b"%d" % good, db=self._meta)

    # -- writing -----------------------------------------------------------------------------
    def put_many(self, chunks: Iterable[bytes]) -> list[bytes]:
        """Store chunks (deduplicated); returns their ids in order. Durable when it returns."""
        ids: list[bytes] = []
        pending: dict[bytes, bytes] = {}
        for data in chunks:
            cid = chunk_id(data)
            ids.append(cid)
            pending.setdefault(cid, data)
        with self._lock:
            with self._env.begin() as txn:
                todo = [(c, d) for c, d in pending.items() if txn.get(c, db=self._chunks) is None]
                current = self._current_pack(txn)
                mark = self._committed(txn, current)
            if not todo:
                return ids
            if mark >= PACK_LIMIT:
                current, mark = current + 1, 0
            path = self._pack_path(current)
            entries: list[tuple[bytes, bytes]] = []
            with path.open("ab") as fh:
                if fh.tell() != mark:  # someone left a tail: recovery should have cut it
                    fh.truncate(mark)
                    fh.seek(mark)
                offset = mark
                for cid, data in todo:
                    comp = self._cctx.compress(data)
                    fh.write(HEADER.pack(MAGIC, cid, len(data), len(comp)))
                    fh.write(comp)
                    entries.append((cid, LOC.pack(current, offset + HEADER.size, len(comp),
                                                  len(data))))
                    offset += HEADER.size + len(comp)
                fh.flush()
                os.fsync(fh.fileno())
            with self._env.begin(write=True) as txn:
                for cid, loc in entries:
                    txn.put(cid, loc, db=self._chunks, overwrite=False)
                txn.put(b"len:%d" % current, b"%d" % offset, db=self._meta)
                txn.put(b"current", b"%d" % current, db=self._meta)
        return ids

    def put(self, data: bytes) -> bytes:
        return self.put_many([data])[0]

    # -- reading -----------------------------------------------------------------------------
    def locate(self, cid: bytes) -> Location | None:
        with self._env.begin() as txn:
            raw = txn.get(cid, db=self._chunks)
        return Location(*LOC.unpack(raw)) if raw else None

    def has_many(self, ids: Iterable[bytes]) -> list[bool]:
        with self._env.begin() as txn:
            return [txn.get(c, db=self._chunks) is not None for c in ids]

    def _fd(self, pack: int) -> int:
        fd = self._read_fds.get(pack)
        if fd is None:
            fd = os.open(self._pack_path(pack), os.O_RDONLY)
            self._read_fds[pack] = fd
        return fd

    def get(self, cid: bytes) -> bytes:
        """The chunk's bytes, verified against its id; never returns unverified data."""
        loc = self.locate(cid)
        if loc is None:
            raise MissingChunk(f"chunk {cid.hex()} is not in the store",
                               hint="import the image again or fetch it from another store")
        payload = os.pread(self._fd(loc.pack), loc.comp_len, loc.offset)
        try:
            data = zstandard.ZstdDecompressor().decompress(payload, max_output_size=loc.raw_len)
        except zstandard.ZstdError as exc:
            raise self._corrupt(cid, loc, f"does not decompress: {exc}") from exc
        if len(data) != loc.raw_len or chunk_id(data) != cid:
            raise self._corrupt(cid, loc, "content does not match its hash")
        return data

    def _corrupt(self, cid: bytes, loc: Location, why: str) -> CorruptChunk:
        return CorruptChunk(
            f"chunk {cid.hex()} in {self._pack_path(loc.pack).name} at {loc.offset} {why}",
            hint="run 'corral image verify' to list every affected object; re-import them",
            details={"chunk": cid.hex(), "pack": loc.pack, "offset": loc.offset},
        )

    def __iter__(self) -> Iterator[tuple[bytes, Location]]:
        with self._env.begin() as txn:
            for cid, raw in txn.cursor(db=self._chunks):
                yield bytes(cid), Location(*LOC.unpack(raw))

    def __len__(self) -> int:
        with self._env.begin() as txn:
            return int(txn.stat(self._chunks)["entries"])

    def verify(self) -> list[Damage]:
        """Read back every indexed chunk; list the ones that fail (never raises for damage)."""
        damage: list[Damage] = []
        for cid, loc in self:
            try:
                self.get(cid)
            except CorruptChunk as exc:
                damage.append(Damage(loc.pack, loc.offset, cid.hex(), exc.message))
        return damage

    def close(self) -> None:
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()
        self._env.close()

    def __enter__(self) -> PackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
