"""Content-addressed chunk store: zstd chunks appended to pack files, an LMDB index.

Why this shape (USERS.md §6): a store with one file per object slows down as it fills, because
every PUT and GET pays directory lookups and inode churn. Here a PUT is an append to the open pack
plus one B-tree insert, a GET is one index lookup plus one ``pread``, whatever the fill.

Crash safety without a journal of our own: records are appended and the pack is fsynced *before*
the index transaction that names them commits, and the index remembers how much of each pack it
covers. On open, anything past that mark is either a complete record whose hash checks out (it
is indexed) or a torn tail (it is cut off). So a kill -9 at any point leaves every indexed chunk
readable and no index entry pointing at garbage.

The packs are therefore the index's journal, and the index is written in large batches: a write
is acknowledged once its records are fsynced, its entries wait in memory (``_pending``, which
every lookup sees first) and go into LMDB ``flush_at`` chunks at a time, or sooner when a
transaction moves a pack's mark (gc, seal, close). Why: in a full store a batch's random keys
land on as many B-tree pages as it has entries, so committing the index with every batch of a
thousand costs a 4 KiB page copied, written and synced per chunk, more than the chunk itself
(the PUT rate fell as the store filled); a flush of half a million entries shares pages between
many of them. A crash loses no acknowledged chunk: opening re-indexes the records past the
marks, at most ``flush_at`` of them (or ``FLUSH_BYTES``), seconds of reading. Flushing holds the
writers' lock, so a write that triggers one waits for it (seconds in a store of millions).

Record layout: ``MAGIC(4) | id(32) | raw_len(u32) | comp_len(u32) | payload(comp_len)``.

Index layout (2): the ``ids`` table keys each chunk by the first ``KEY_LEN`` bytes of its id
(duplicates allowed) and holds its location in the smallest of a few fixed encodings. A store
that fills keeps its PUT rate only if the index stays small: once a batch's random keys land on
as many B-tree pages as it has chunks, every chunk costs a page copied, written and synced, so
the bytes per entry set the rate (layout 1, the full id to a 20-byte location, took ~93 bytes
of tree per chunk and its rate fell as the tree grew; this one takes ~37). The prefix is not
trusted: a hit counts only once the id in its record's header matches the whole id, so two ids
sharing a prefix are simply two entries, and an id crafted to collide finds nothing. The price
is a read of the header (36 bytes, usually in the page cache) per hit of a presence check; a
GET reads it with the payload, in the same ``pread``. A layout-1 store is converted when it is
opened (one transaction); the old table is left holding only a marker an older corral cannot
parse, so an older corral's gc stops instead of taking the whole store for garbage.

Garbage collection against pushes (a store opened with ``generations=True``, the server's): a
push is several requests (which chunks are missing, uploads, then naming the manifest), so a
gc may start in the middle of one. Each gc starts a new *generation*; every chunk a push writes
or is told the store holds is stamped with the current generation (the ``touched`` table), and
a sweep keeps, besides what it marked, every chunk stamped in its own generation or the one
before: a push in flight across one whole gc loses nothing. Naming a manifest
(:meth:`PackStore.name_if_whole`) checks that every chunk is present and sets the name in one
transaction, under the same lock as the sweep, so a name never points at a hole. Naming ends a
push, named or refused: it clears the stamps of its chunks (a name protects them now; a refused
push that tries again asks again), so an image pushed, named and removed is garbage at the very
next gc; unless a gc is running, which marked before the name existed: then it stamps them
instead. Stamps live in the LMDB index, so they survive a restart.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import blake3
import lmdb
import zstandard

from corral.errors import ConfigError
from corral.errors import (
    CorruptChunk as CorruptChunk,  # lives in errors.py with the rest
)
from corral.errors import (
    MissingChunk as MissingChunk,  # lives in errors.py with the rest
)

T = TypeVar("T")

MAGIC = b"CRC1"
HEADER = struct.Struct(">4s32sII")
LOC = struct.Struct(">IQII")  # layout 1's location: pack number, offset, comp_len, raw_len
PACK_LIMIT = 512 * 1024**2
#: index entries kept in memory before they are written to LMDB at once (see the module doc),
#: and the bytes of records behind them that make a flush come sooner (what an open after a
#: crash reads again)
FLUSH_AT = 512 * 1024
FLUSH_BYTES = 1024**3
#: the index layout written here (see the module doc); 1 keyed table ``chunks`` by whole ids
LAYOUT = 2
#: bytes of an id that key the index; the rest is checked against the record's header
KEY_LEN = 5
#: what layout 1's table keeps once converted: a value no older corral can unpack
OLD_MARKER = (b"\0corral-index-layout", b"%d" % LAYOUT)
#: a location's encodings (pack, offset, comp_len, raw_len), told apart by their length: the
#: smallest that fits is used, 9 bytes for a chunk under 64 KiB in one of the first 256 packs
_V9, _V10, _V13, _V14, _V20 = (struct.Struct(f) for f in
                               ("<BIHH", "<HIHH", "<BIII", "<HIII", "<IQII"))
_BY_SIZE = {v.size: v for v in (_V9, _V10, _V13, _V14, _V20)}


def chunk_id(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def encode_location(pack: int, offset: int, comp_len: int, raw_len: int) -> bytes:
    if offset < 1 << 32:
        if comp_len < 1 << 16 and raw_len < 1 << 16:
            if pack < 1 << 8:
                return _V9.pack(pack, offset, comp_len, raw_len)
            if pack < 1 << 16:
                return _V10.pack(pack, offset, comp_len, raw_len)
        elif pack < 1 << 8:
            return _V13.pack(pack, offset, comp_len, raw_len)
        elif pack < 1 << 16:
            return _V14.pack(pack, offset, comp_len, raw_len)
    return _V20.pack(pack, offset, comp_len, raw_len)


def decode_location(raw: bytes) -> Location:
    return Location(*_BY_SIZE[len(raw)].unpack(raw))


@dataclass(frozen=True)
class Location:
    pack: int
    offset: int
    comp_len: int
    raw_len: int


@dataclass(frozen=True)
class SweepResult:
    dropped: int  # index entries of unreferenced chunks removed
    packs_rewritten: int
    bytes_freed: int
    damaged: list[str]  # live chunks that could not be read back (left in place, reported)


@dataclass(frozen=True)
class Naming:
    """What :meth:`PackStore.name_if_whole` did: named, or why not."""

    named: bool
    exists: bool  # the name was taken and replace was not asked for
    missing: list[bytes]  # chunks not stored (nothing was named)


@dataclass(frozen=True)
class Damage:
    pack: int
    offset: int
    chunk: str
    reason: str


class PackStore:
    """Thread-safe for many readers and one writer at a time (writes take a lock)."""

    def __init__(self, root: Path, *, map_size: int = 64 * 1024**3, level: int = 3,
                 generations: bool = False, flush_at: int = FLUSH_AT) -> None:
        """``generations``: stamp what writes and :meth:`present` touch, for a gc that runs
        while pushes go on (the server's store; see the module doc). An agent's cache sweeps
        with creates held off instead, and leaves it off. ``flush_at``: index entries held in
        memory before they are written to the index (1: every write, as layout 1 did)."""
        self.root = Path(root)
        self.flush_at = max(1, flush_at)
        #: durable records not yet in the index: id -> encoded location (writers hold the lock)
        self._pending: dict[bytes, bytes] = {}
        self._pending_bytes = 0
        #: flushes so far: a reader whose snapshot predates one looks again (see _read)
        self._flushes = 0
        #: the pack appended to and its end; the index's marks lag while entries are pending
        self._tail = (0, 0)
        (self.root / "packs").mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(
            str(self.root / "index"), map_size=map_size, max_dbs=8, subdir=True, sync=True
        )
        self._ids = self._env.open_db(b"ids", dupsort=True)
        self._meta = self._env.open_db(b"meta")
        self._refs = self._env.open_db(b"refs")
        self._touched = self._env.open_db(b"touched")
        self._lock = threading.Lock()
        self._cctx = zstandard.ZstdCompressor(level=level)
        self._read_fds: dict[int, int] = {}
        self._fd_lock = threading.Lock()
        self.generations = generations
        #: the generation of the gc between :meth:`begin_gc` and :meth:`end_gc`, if any
        self._gc_gen: int | None = None
        self._migrate()
        self._recover()
        with self._env.begin() as txn:
            current = self._current_pack(txn)
            self._tail = (current, self._committed(txn, current))

    # -- packs -------------------------------------------------------------------------------
    def _pack_path(self, n: int) -> Path:
        return self.root / "packs" / f"pack-{n:08d}.dat"

    def _committed(self, txn: lmdb.Transaction, n: int) -> int:
        raw = txn.get(b"len:%d" % n, db=self._meta)
        return int(raw) if raw else 0

    def _current_pack(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(b"current", db=self._meta)
        return int(raw) if raw else 0

    def _migrate(self) -> None:
        """Bring the index to :data:`LAYOUT` (see the module doc), in one transaction."""
        with self._env.begin(write=True) as txn:
            raw = txn.get(b"layout", db=self._meta)
            layout = int(raw) if raw else 1
            if layout > LAYOUT:
                raise ConfigError(
                    f"the image store at {self.root} has index layout {layout}; this corral "
                    f"reads layouts up to {LAYOUT}",
                    hint="run the corral that wrote it (a newer one), or restore the store "
                         "from a copy made by this version")
            try:
                old = self._env.open_db(b"chunks", txn=txn, create=False)
            except lmdb.NotFoundError:
                old = None
            marked = old is not None and txn.get(OLD_MARKER[0], db=old) == OLD_MARKER[1]
            if old is not None and txn.stat(old)["entries"] > int(marked):
                # entries of layout 1 (or written by an older corral since): moved over
                txn.cursor(db=self._ids).putmulti(
                    ((bytes(k)[:KEY_LEN], encode_location(*LOC.unpack(v)))
                     for k, v in txn.cursor(db=old) if len(v) == LOC.size), dupdata=True)
                txn.drop(old, delete=False)
                txn.put(*OLD_MARKER, db=old)
            if layout != LAYOUT:
                txn.put(b"layout", b"%d" % LAYOUT, db=self._meta)

    def _key_matches(self, raw: bytes, cid: bytes, payload: bool
                     ) -> tuple[Location, bytes] | None:
        """(location, stored bytes when ``payload``) if the record ``raw`` points at is
        ``cid``'s, read in one ``pread`` with its header."""
        loc = decode_location(raw)
        start = loc.offset - HEADER.size
        try:
            buf = os.pread(self._fd(loc.pack), HEADER.size + (loc.comp_len if payload else 0),
                           start)
        except OSError:
            return None
        if buf[:4] != MAGIC or buf[4:36] != cid:
            return None
        return loc, buf[HEADER.size:]

    def _lookup(self, txn: lmdb.Transaction, cid: bytes, payload: bool = False
                ) -> tuple[Location, bytes] | None:
        """Where ``cid`` is stored (and its stored bytes, when ``payload``), or None: the
        index's prefix hits, checked against their records' headers."""
        pending = self._pending.get(cid)
        if pending is not None:  # a whole id: no header to check it against
            loc = decode_location(pending)
            if not payload:
                return loc, b""
            return loc, os.pread(self._fd(loc.pack), loc.comp_len, loc.offset)
        key = cid[:KEY_LEN]
        got = txn.get(key, db=self._ids)
        if got is None:
            return None
        first = bytes(got)
        found = self._key_matches(first, cid, payload)
        if found is not None:
            return found
        cur = txn.cursor(db=self._ids)
        if cur.set_key(key):
            for raw in cur.iternext_dup():
                if raw != first:
                    found = self._key_matches(bytes(raw), cid, payload)
                    if found is not None:
                        return found
        return None

    def _record_id(self, loc: Location) -> bytes | None:
        """The id in the header of the record at ``loc`` (None if it is not a record's)."""
        try:
            head = os.pread(self._fd(loc.pack), HEADER.size, loc.offset - HEADER.size)
        except OSError:
            return None
        if len(head) < HEADER.size:
            return None
        magic, cid, raw_len, comp_len = HEADER.unpack(head)
        if magic != MAGIC or raw_len != loc.raw_len or comp_len != loc.comp_len:
            return None
        return bytes(cid)

    def _entries(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, bytes, Location,
                                                                bytes | None]]:
        """Every index entry: (key, value, location, the id its record holds, None when the
        record does not match the key: damaged)."""
        for key, raw in txn.cursor(db=self._ids):
            key, raw = bytes(key), bytes(raw)
            loc = decode_location(raw)
            cid = self._record_id(loc)
            yield key, raw, loc, cid if cid is not None and cid[:KEY_LEN] == key else None

    def _recover(self) -> None:
        """Index complete records past each pack's committed mark; cut torn tails."""
        with self._env.begin(write=True) as txn:
            current = self._current_pack(txn)
            for key, _ in list(txn.cursor(db=self._meta)):
                if bytes(key).startswith(b"dead:"):
                    self._pack_path(int(bytes(key)[5:])).unlink(missing_ok=True)
                    txn.delete(key, db=self._meta)
            # writes may have moved on to packs the index never heard of (it lags them)
            on_disk = [int(p.stem.split("-")[1]) for p in (self.root / "packs").glob("pack-*.dat")]
            if on_disk and max(on_disk) > current:
                current = max(on_disk)
                txn.put(b"current", b"%d" % current, db=self._meta)
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
                        good += HEADER.size + comp_len
                        if self._lookup(txn, cid) is None:
                            txn.put(cid[:KEY_LEN], encode_location(
                                n, good - comp_len, comp_len, raw_len), db=self._ids)
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
            self._append(list(pending.items()), only_new=True, touch=pending)
        return ids

    def _append(self, items: list[tuple[bytes, bytes]], only_new: bool,
                moved: dict[bytes, bytes] | None = None,
                raw_lens: dict[bytes, int] | None = None,
                touch: Iterable[bytes] = ()) -> None:
        """Append records and index them (caller holds the lock). ``moved`` collects new
        locations instead of indexing them, for the GC to swap in one transaction. With
        ``raw_lens`` the items are already compressed (and verified by the caller). ``touch``:
        ids to stamp with the generation (written or found stored), in the same transaction."""
        touch = list(touch) if self.generations else []
        with self._env.begin() as txn:
            seen: set[bytes] = set()
            todo = []
            for c, d in items:
                if c not in seen and (not only_new or self._lookup(txn, c) is None):
                    todo.append((c, d))
                seen.add(c)
        current, mark = self._tail
        if not todo:
            if touch:
                with self._env.begin(write=True) as txn:
                    self._stamp(txn, touch)
            return
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
                if raw_lens is None:
                    comp, raw_len = self._cctx.compress(data), len(data)
                else:
                    comp, raw_len = data, raw_lens[cid]
                fh.write(HEADER.pack(MAGIC, cid, raw_len, len(comp)))
                fh.write(comp)
                offset += HEADER.size
                entries.append((cid, encode_location(current, offset, len(comp), raw_len)))
                offset += len(comp)
            fh.flush()
            os.fdatasync(fh.fileno())
        self._tail = (current, offset)
        if moved is not None:
            moved.update(entries)
        else:
            self._pending.update(entries)
            self._pending_bytes += offset - mark
        flush = (moved is not None or len(self._pending) >= self.flush_at
                 or self._pending_bytes >= FLUSH_BYTES)
        if flush or touch:
            with self._env.begin(write=True) as txn:
                if flush:
                    self._flush_into(txn)
                self._stamp(txn, touch)
            if flush:
                self._flushed()

    def _flush_into(self, txn: lmdb.Transaction) -> None:
        """Write the pending entries and the tail's mark in ``txn`` (caller holds the lock and
        calls :meth:`_flushed` once it commits). Every mark written goes with the entries
        before it: a mark past an unindexed record would hide it from recovery."""
        if self._pending:  # in key order: neighbours share the B-tree pages they touch
            txn.cursor(db=self._ids).putmulti(
                sorted((cid[:KEY_LEN], loc) for cid, loc in self._pending.items()),
                dupdata=True)
        current, offset = self._tail
        for n in range(self._current_pack(txn), current):  # packs filled since the last flush
            path = self._pack_path(n)
            if path.exists():
                txn.put(b"len:%d" % n, b"%d" % path.stat().st_size, db=self._meta)
        txn.put(b"len:%d" % current, b"%d" % offset, db=self._meta)
        txn.put(b"current", b"%d" % current, db=self._meta)

    def _flushed(self) -> None:
        # the count moves before the entries leave memory (see _read)
        self._flushes += 1
        self._pending = {}
        self._pending_bytes = 0

    def flush(self) -> None:
        """Write the pending index entries to the index now (close does)."""
        with self._lock:
            if self._pending:
                with self._env.begin(write=True) as txn:
                    self._flush_into(txn)
                self._flushed()

    def put_compressed(self, records: list[tuple[bytes, int, bytes]]) -> None:
        """Store chunks that arrive compressed (from another store), after checking each one
        decompresses to content matching its id: a fetched chunk is trusted no more than a
        read one."""
        checked: list[tuple[bytes, bytes]] = []
        lens: dict[bytes, int] = {}
        for cid, raw_len, comp in records:
            try:
                data = zstandard.ZstdDecompressor().decompress(comp, max_output_size=raw_len)
            except zstandard.ZstdError as exc:
                raise CorruptChunk(f"received chunk {cid.hex()} does not decompress: {exc}",
                                   hint="the sender's store may be damaged; run its verify"
                                   ) from exc
            if len(data) != raw_len or chunk_id(data) != cid:
                raise CorruptChunk(f"received chunk {cid.hex()} does not match its hash",
                                   hint="the sender's store may be damaged; run its verify")
            checked.append((cid, comp))
            lens[cid] = raw_len
        with self._lock:
            self._append(checked, only_new=True, raw_lens=lens, touch=lens)

    def read_compressed(self, cid: bytes) -> tuple[int, bytes] | None:
        """(raw length, stored bytes) of a chunk, unverified, for sending to a store that
        verifies on receipt (:meth:`put_compressed`)."""
        found = self._read(lambda txn: self._lookup(txn, cid, payload=True))
        if found is None:
            return None
        return found[0].raw_len, found[1]

    def put(self, data: bytes) -> bytes:
        return self.put_many([data])[0]

    # -- reading -----------------------------------------------------------------------------
    def _read(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """``fn`` in a read transaction, again if a flush ran meanwhile: a snapshot taken
        before a flush committed, read after its entries left memory, would miss them."""
        while True:
            flushes = self._flushes
            with self._env.begin() as txn:
                result = fn(txn)
            if self._flushes == flushes:
                return result

    def locate(self, cid: bytes) -> Location | None:
        found = self._read(lambda txn: self._lookup(txn, cid))
        return found[0] if found is not None else None

    def has_many(self, ids: Iterable[bytes]) -> list[bool]:
        ids = list(ids)
        return self._read(lambda txn: [self._lookup(txn, c) is not None for c in ids])

    def present(self, ids: Iterable[bytes]) -> list[bool]:
        """:meth:`has_many` for a push that will rely on the answer: the ids found stored are
        stamped, atomically with the check against a sweep, so the push never needs to upload
        them however a gc falls (see the module doc)."""
        ids = list(ids)
        if not self.generations:
            return self.has_many(ids)
        with self._lock, self._env.begin(write=True) as txn:
            have = [self._lookup(txn, c) is not None for c in ids]
            self._stamp(txn, [c for c, h in zip(ids, have, strict=True) if h])
        return have

    def _fd(self, pack: int) -> int:
        fd = self._read_fds.get(pack)
        if fd is None:
            with self._fd_lock:
                fd = self._read_fds.get(pack)
                if fd is None:
                    fd = self._read_fds[pack] = os.open(self._pack_path(pack), os.O_RDONLY)
        return fd

    def get(self, cid: bytes) -> bytes:
        """The chunk's bytes, verified against its id; never returns unverified data."""
        found = self._read(lambda txn: self._lookup(txn, cid, payload=True))
        if found is None:
            raise MissingChunk(f"chunk {cid.hex()} is not in the store",
                               hint="import the image again or fetch it from another store")
        return self._checked(cid, *found)

    def _checked(self, cid: bytes, loc: Location, payload: bytes) -> bytes:
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
        """Every chunk whose record reads back as the index says (ids come from the records'
        headers: a ``pread`` each; :meth:`verify` lists the others)."""
        self.flush()
        with self._env.begin() as txn:
            for _, _, loc, cid in self._entries(txn):
                if cid is not None:
                    yield cid, loc

    def __len__(self) -> int:
        with self._lock, self._env.begin() as txn:
            return int(txn.stat(self._ids)["entries"]) + len(self._pending)

    def index_stat(self) -> dict[str, int]:
        """The index's entries and B-tree pages (for figures: bytes per chunk)."""
        self.flush()
        with self._env.begin() as txn:
            st = txn.stat(self._ids)
        return {"entries": int(st["entries"]), "page_size": int(st["psize"]),
                "pages": int(st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]),
                "file_bytes": int(self._env.info()["last_pgno"] + 1) * int(st["psize"])}

    def _read_at(self, cid: bytes, loc: Location) -> bytes:
        """The chunk at ``loc`` (not wherever the index finds ``cid`` first), verified."""
        payload = os.pread(self._fd(loc.pack), loc.comp_len, loc.offset)
        return self._checked(cid, loc, payload)

    def verify(self) -> list[Damage]:
        """Read back every indexed chunk; list the ones that fail (never raises for damage).
        A record whose header no longer matches its entry is named by the index's prefix of
        its id (the rest of the id was in the damaged header)."""
        self.flush()
        damage: list[Damage] = []
        with self._env.begin() as txn:
            for key, _, loc, cid in self._entries(txn):
                if cid is None:
                    damage.append(Damage(loc.pack, loc.offset, key.hex(),
                                         "its record's header does not match the index"))
                    continue
                try:
                    self._read_at(cid, loc)
                except CorruptChunk as exc:
                    damage.append(Damage(loc.pack, loc.offset, cid.hex(), exc.message))
        return damage

    # -- names -------------------------------------------------------------------------------
    def set_ref(self, name: str, target: bytes) -> None:
        with self._env.begin(write=True) as txn:
            txn.put(name.encode(), target, db=self._refs)

    def get_ref(self, name: str) -> bytes | None:
        with self._env.begin() as txn:
            raw = txn.get(name.encode(), db=self._refs)
        return bytes(raw) if raw is not None else None

    def del_ref(self, name: str) -> bool:
        with self._env.begin(write=True) as txn:
            return bool(txn.delete(name.encode(), db=self._refs))

    def refs(self) -> dict[str, bytes]:
        with self._env.begin() as txn:
            return {bytes(k).decode(): bytes(v) for k, v in txn.cursor(db=self._refs)}

    def name_if_whole(self, name: str, target: bytes, ids: Iterable[bytes],
                      replace: bool = False) -> Naming:
        """Point ``name`` at ``target`` only if it and every chunk of ``ids`` are stored (and
        the name is free, unless ``replace``): checked and set in one transaction under the
        writers' lock, which a sweep holds too, so no gc can take a chunk in between. Either
        way the push is over: its stamps are cleared (see the module doc)."""
        ids = [target, *ids]
        key = name.encode()
        with self._lock, self._env.begin(write=True) as txn:
            done = Naming(named=False, exists=True, missing=[])
            if replace or txn.get(key, db=self._refs) is None:
                missing = [c for c in ids if self._lookup(txn, c) is None]
                done = Naming(named=not missing, exists=False, missing=missing)
                if done.named:
                    txn.put(key, target, db=self._refs)
            # the push ends here, named or not: the name keeps its chunks from now on, and
            # a refused push that tries again asks again. A running gc marked before this
            # name existed: it keeps them through their stamps instead.
            if self.generations:
                if self._gc_gen is not None:
                    self._stamp(txn, ids)
                else:
                    for c in ids:
                        txn.delete(c, db=self._touched)
        return done

    # -- generations -------------------------------------------------------------------------
    def _generation(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(b"gen", db=self._meta)
        return int(raw) if raw else 0

    def _stamp(self, txn: lmdb.Transaction, ids: Iterable[bytes]) -> None:
        """Stamp ``ids`` with the current generation (caller holds the lock, in a write txn)."""
        if not self.generations:
            return
        gen = b"%d" % self._generation(txn)
        for c in ids:
            txn.put(c, gen, db=self._touched)

    def touched(self) -> dict[bytes, int]:
        """Chunk id -> the generation a push last relied on it (for tests and figures)."""
        with self._env.begin() as txn:
            return {bytes(k): int(v) for k, v in txn.cursor(db=self._touched)}

    # -- garbage collection -----------------------------------------------------------------
    def begin_gc(self) -> int:
        """Start a gc: a new generation (writes and :meth:`present` from now on stamp it), and
        names set from now until :meth:`end_gc` stamp their chunks instead of clearing them.
        Returns the generation to pass to :meth:`sweep`."""
        with self._lock, self._env.begin(write=True) as txn:
            gen = self._generation(txn) + 1
            txn.put(b"gen", b"%d" % gen, db=self._meta)
            self._gc_gen = gen
        return gen

    def end_gc(self) -> None:
        with self._lock:
            self._gc_gen = None

    def sweep(self, live: set[bytes], min_dead_ratio: float = 0.25,
              generation: int | None = None) -> SweepResult:
        """Drop chunks not in ``live``; rewrite sealed packs that are mostly dead. With the
        ``generation`` of :meth:`begin_gc`, chunks a push stamped in it or the one before are
        kept too, and stamps no later gc needs are dropped.

        Crash-safe: live records are copied and fsynced first, the index swaps to the copies and
        marks the old pack dead in one transaction, and only then is the old file removed."""
        with self._lock:
            with self._env.begin(write=True) as txn:  # the index whole, marks where packs end
                self._flush_into(txn)
            self._flushed()
            keep = set(live)
            stale: list[bytes] = []
            if generation is not None:
                for cid, gen in self.touched().items():
                    if gen >= generation - 1:
                        keep.add(cid)
                    if gen < generation:  # the next gc keeps only stamps of this one on
                        stale.append(cid)
            # an entry whose record does not name it (cid None) cannot be told live or dead:
            # it stays, and its pack is never rewritten (reported as damaged instead)
            by_pack: dict[int, list[tuple[bytes | None, bytes, bytes, Location]]] = {}
            dead: list[tuple[bytes, bytes]] = []
            with self._env.begin() as txn:
                current = self._current_pack(txn)
                for key, raw, loc, rid in self._entries(txn):
                    if rid is None or rid in keep:
                        by_pack.setdefault(loc.pack, []).append((rid, key, raw, loc))
                    else:
                        dead.append((key, raw))
            with self._env.begin(write=True) as txn:
                for key, raw in dead:
                    txn.delete(key, raw, db=self._ids)
                for cid in stale:
                    txn.delete(cid, db=self._touched)
            rewritten, freed, damaged = 0, 0, []
            for path in sorted((self.root / "packs").glob("pack-*.dat")):
                n = int(path.stem.split("-")[1])
                if n >= current:
                    continue
                entries = by_pack.get(n, [])
                size = path.stat().st_size
                live_bytes = sum(HEADER.size + loc.comp_len for *_, loc in entries)
                if size == 0 or (size - live_bytes) / size < min_dead_ratio:
                    continue
                items: list[tuple[bytes, bytes]] = []
                bad = []
                for rid, key, _, loc in entries:
                    if rid is None:
                        bad.append(key.hex())
                        continue
                    try:
                        items.append((rid, self._read_at(rid, loc)))
                    except CorruptChunk:
                        bad.append(rid.hex())
                if bad:
                    damaged.extend(bad)
                    continue  # never delete a pack holding live data we could not copy
                moved: dict[bytes, bytes] = {}
                self._append(items, only_new=False, moved=moved)
                with self._env.begin(write=True) as txn:
                    for rid, key, raw, _ in entries:
                        assert rid is not None  # a pack with unreadable entries is kept
                        txn.delete(key, raw, db=self._ids)
                        txn.put(key, moved[rid], db=self._ids)
                    txn.delete(b"len:%d" % n, db=self._meta)
                    txn.put(b"dead:%d" % n, b"1", db=self._meta)
                fd = self._read_fds.pop(n, None)
                if fd is not None:
                    os.close(fd)
                path.unlink()
                with self._env.begin(write=True) as txn:
                    txn.delete(b"dead:%d" % n, db=self._meta)
                rewritten += 1
                freed += size - live_bytes
            return SweepResult(len(dead), rewritten, freed, damaged)

    def seal(self) -> None:
        """Start a new pack for the next writes (lets a sweep reclaim the one that was open)."""
        with self._lock:
            current, offset = self._tail
            with self._env.begin(write=True) as txn:
                self._flush_into(txn)
                if offset > 0:
                    txn.put(b"current", b"%d" % (current + 1), db=self._meta)
            self._flushed()
            if offset > 0:
                self._tail = (current + 1, 0)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            for fd in self._read_fds.values():
                os.close(fd)
            self._read_fds.clear()
            self._env.close()

    def __enter__(self) -> PackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
