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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3
import lmdb
import zstandard

from corral.errors import (
    CorruptChunk as CorruptChunk,  # lives in errors.py with the rest
)
from corral.errors import (
    MissingChunk as MissingChunk,  # lives in errors.py with the rest
)

MAGIC = b"CRC1"
HEADER = struct.Struct(">4s32sII")
LOC = struct.Struct(">IQII")  # pack number, offset, comp_len, raw_len
PACK_LIMIT = 512 * 1024**2


def chunk_id(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


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
                 generations: bool = False) -> None:
        """``generations``: stamp what writes and :meth:`present` touch, for a gc that runs
        while pushes go on (the server's store; see the module doc). An agent's cache sweeps
        with creates held off instead, and leaves it off."""
        self.root = Path(root)
        (self.root / "packs").mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(
            str(self.root / "index"), map_size=map_size, max_dbs=4, subdir=True, sync=True
        )
        self._chunks = self._env.open_db(b"chunks")
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
            for key, _ in list(txn.cursor(db=self._meta)):
                if bytes(key).startswith(b"dead:"):
                    self._pack_path(int(bytes(key)[5:])).unlink(missing_ok=True)
                    txn.delete(key, db=self._meta)
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
            todo = [(c, d) for c, d in items
                    if not only_new or txn.get(c, db=self._chunks) is None]
            current = self._current_pack(txn)
            mark = self._committed(txn, current)
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
                entries.append((cid, LOC.pack(current, offset + HEADER.size, len(comp),
                                              raw_len)))
                offset += HEADER.size + len(comp)
            fh.flush()
            os.fsync(fh.fileno())
        with self._env.begin(write=True) as txn:
            for cid, loc in entries:
                if moved is not None:
                    moved[cid] = loc
                else:
                    txn.put(cid, loc, db=self._chunks, overwrite=False)
            txn.put(b"len:%d" % current, b"%d" % offset, db=self._meta)
            txn.put(b"current", b"%d" % current, db=self._meta)
            self._stamp(txn, touch)

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
        loc = self.locate(cid)
        if loc is None:
            return None
        return loc.raw_len, os.pread(self._fd(loc.pack), loc.comp_len, loc.offset)

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

    def present(self, ids: Iterable[bytes]) -> list[bool]:
        """:meth:`has_many` for a push that will rely on the answer: the ids found stored are
        stamped, atomically with the check against a sweep, so the push never needs to upload
        them however a gc falls (see the module doc)."""
        ids = list(ids)
        if not self.generations:
            return self.has_many(ids)
        with self._lock, self._env.begin(write=True) as txn:
            have = [txn.get(c, db=self._chunks) is not None for c in ids]
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
                missing = [c for c in ids if txn.get(c, db=self._chunks) is None]
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
            keep = set(live)
            stale: list[bytes] = []
            if generation is not None:
                for cid, gen in self.touched().items():
                    if gen >= generation - 1:
                        keep.add(cid)
                    if gen < generation:  # the next gc keeps only stamps of this one on
                        stale.append(cid)
            with self._env.begin() as txn:
                current = self._current_pack(txn)
            by_pack: dict[int, list[tuple[bytes, Location]]] = {}
            dead: list[bytes] = []
            for cid, loc in self:
                if cid in keep:
                    by_pack.setdefault(loc.pack, []).append((cid, loc))
                else:
                    dead.append(cid)
            with self._env.begin(write=True) as txn:
                for cid in dead:
                    txn.delete(cid, db=self._chunks)
                for cid in stale:
                    txn.delete(cid, db=self._touched)
            rewritten, freed, damaged = 0, 0, []
            for path in sorted((self.root / "packs").glob("pack-*.dat")):
                n = int(path.stem.split("-")[1])
                if n >= current:
                    continue
                entries = by_pack.get(n, [])
                size = path.stat().st_size
                live_bytes = sum(HEADER.size + loc.comp_len for _, loc in entries)
                if size == 0 or (size - live_bytes) / size < min_dead_ratio:
                    continue
                items: list[tuple[bytes, bytes]] = []
                bad = []
                for cid, _ in entries:
                    try:
                        items.append((cid, self.get(cid)))
                    except CorruptChunk:
                        bad.append(cid.hex())
                if bad:
                    damaged.extend(bad)
                    continue  # never delete a pack holding live data we could not copy
                moved: dict[bytes, bytes] = {}
                self._append(items, only_new=False, moved=moved)
                with self._env.begin(write=True) as txn:
                    for cid, loc_raw in moved.items():
                        txn.put(cid, loc_raw, db=self._chunks)
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
        with self._lock, self._env.begin(write=True) as txn:
            current = self._current_pack(txn)
            if self._committed(txn, current) > 0:
                txn.put(b"current", b"%d" % (current + 1), db=self._meta)

    def close(self) -> None:
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()
        self._env.close()

    def __enter__(self) -> PackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
