"""Agent-side log capture: tail a file, publish its lines to JetStream in numbered batches.

Each source (an instance's stdout.log, stderr.log, or a file inside it such as an access log)
keeps a small offsets file: the byte offset read up to and the number of the next line. It is
written only after JetStream acknowledged the batches it covers (when a pump ends, and every
:data:`SAVE_SECONDS` while it works through a backlog), so after an agent crash the batches
acknowledged since are published again with the same line numbers — and, cut the same way, the
same ``Nats-Msg-Id``, which JetStream's duplicate window drops — and every reader (the sinks,
the API's log stream, the traffic view) drops a line it already had, by number. Nothing is lost,
nothing doubled. (An fsync per batch stalled the agent's event loop for up to 50 ms a batch on a
busy disk, and a busy source is a hundred batches a second.)

Only whole lines are sent; a line longer than ``max_line`` is cut into pieces rather than
holding the stream back forever. A file that shrank was truncated or rotated: reading restarts at
its beginning while the line numbers go on.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from corral.bus import subjects
from corral.bus.messages import LogBatch

#: a batch's lines take at most this much JSON: far below NATS's 1 MiB max_payload. A count
#: alone allowed 500 lines of 16 KiB (8 MiB): the bus refused the batch, and since the offset
#: only moves on an ack, capture wedged on it for good
MAX_BATCH_BYTES = 256 * 1024
#: while a pump works through a backlog, its offsets are written (and fsynced) this often
SAVE_SECONDS = 0.25


@dataclass
class Offsets:
    offset: int = 0
    next_seq: int = 1
    inode: int = 0
    #: this capture's run (see ``LogBatch.run``): made with the offsets file, kept with it
    run: str = field(default_factory=lambda: secrets.token_hex(4))


class LogCapture:
    def __init__(self, path: Path, state: Path, host: str, instance: str, source: str,
                 max_batch: int = 500, max_line: int = 16 * 1024,
                 max_bytes: int = MAX_BATCH_BYTES) -> None:
        self.path = Path(path)
        self.state = Path(state)
        self.host, self.instance, self.source = host, instance, source
        self.max_batch = max_batch
        self.max_line = max_line
        self.max_bytes = max_bytes
        self.pos = self._load()
        #: called with the fd of each file opened for reading (the agent watches it, to pump
        #: as soon as the file is written)
        self.on_open: Callable[[int], None] | None = None

    def _load(self) -> Offsets:
        try:
            raw = json.loads(self.state.read_text())
            # a file written before runs existed keeps numbering without one
            return Offsets(int(raw["offset"]), int(raw["next_seq"]), int(raw.get("inode", 0)),
                           str(raw.get("run", "")))
        except (FileNotFoundError, ValueError, KeyError):
            return Offsets()

    def _save(self) -> None:
        tmp = self.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.pos.__dict__))
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.state)

    #: the file's size when it was last read (the lag is measured against it)
    seen_size = 0

    @property
    def lag_bytes(self) -> int:
        """Bytes written to the file, as last seen, that have not reached the bus yet."""
        return max(0, self.seen_size - self.pos.offset)

    def open(self) -> IO[bytes] | None:
        """The file to read now, or None while there is none. A subclass may open it its own
        way: the agent never follows a tailed path out of the instance's disk."""
        try:
            return self.path.open("rb")
        except FileNotFoundError:
            return None

    @property
    def _read_size(self) -> int:
        """Bytes read for one batch: enough to decide it exactly as the whole rest of the file
        would. Each line costs at least its bytes plus two in the JSON (the quotes; an escape
        is never shorter than what it stands for), so a batch's lines take less than
        ``max_bytes`` of the file, and past them ``max_line + 1`` bytes tell a next line from an
        overlong one. ``max_batch * max_line`` (8 MiB) used to be read for each ~100 KiB
        batch of a file far behind: a 200,000-line backlog cost 2 s of reads."""
        return self.max_bytes + self.max_line + 1

    def read_batch(self) -> tuple[LogBatch | None, int]:
        """The next batch of whole lines and the offset just past them (nothing is saved)."""
        fh = self.open()
        if fh is None:
            return None, self.pos.offset
        with fh:
            st = os.fstat(fh.fileno())  # of the file opened, not of whatever the path is now
            if self.on_open is not None:
                self.on_open(fh.fileno())
            self.seen_size = st.st_size
            if st.st_ino != self.pos.inode or st.st_size < self.pos.offset:
                if self.pos.inode != 0 or st.st_size < self.pos.offset:
                    self.pos.offset = 0  # rotated or truncated: a new file starts at its start
                self.pos.inode = st.st_ino
            if st.st_size == self.pos.offset:
                return None, self.pos.offset
            fh.seek(self.pos.offset)
            data = fh.read(min(st.st_size - self.pos.offset, self._read_size))
        lines: list[str] = []
        used = 0
        size = 0  # what the lines take in the batch's JSON, escapes included
        while len(lines) < self.max_batch:
            nl = data.find(b"\n", used)
            if nl == -1 or nl - used > self.max_line:
                if len(data) - used < self.max_line:
                    break
                end, skip = used + self.max_line, 0  # an overlong line: send a piece
            else:
                end, skip = nl, 1
            line = data[used:end].decode(errors="replace")
            cost = len(json.dumps(line).encode()) + 1
            if lines and size + cost > self.max_bytes:
                break  # the rest goes in the next batch: never more than the bus takes
            lines.append(line)
            size += cost
            used = end + skip
        if not lines:
            return None, self.pos.offset
        batch = LogBatch(host=self.host, instance=self.instance, source=self.source,
                         first_seq=self.pos.next_seq, lines=lines, ts=time.time(),
                         run=self.pos.run)
        return batch, self.pos.offset + used

    def skip_existing(self) -> bool:
        """Start past what the file holds now, if this capture has no offsets yet (a file that
        is not there yet is read from its start when it comes). Returns whether it skipped."""
        if self.state.exists():
            return False
        fh = self.open()
        if fh is None:
            return False
        with fh:
            st = os.fstat(fh.fileno())
        self.pos.offset, self.pos.inode = st.st_size, st.st_ino
        self._save()
        return True

    async def pump(self, js: Any) -> int:
        """Publish everything the file held when it was read (a backlog batch after batch);
        returns how many lines went out."""
        sent = 0
        unsaved = False
        saved_at = time.monotonic()
        try:
            while True:
                batch, end = self.read_batch()
                if batch is None:
                    return sent
                if not self.state.exists():
                    # the run is named before its first line goes out: a capture killed before
                    # its first save started a new run, whose lines no reader took for the
                    # ones it had (the same numbers, another run: 658 lines doubled)
                    self._save()
                await js.publish(subjects.logs(self.host, self.instance),
                                 batch.model_dump_json().encode(),
                                 headers={"Nats-Msg-Id": batch.msg_id})
                self.pos.offset = end
                self.pos.next_seq += len(batch.lines)
                sent += len(batch.lines)
                unsaved = True
                if time.monotonic() - saved_at >= SAVE_SECONDS:
                    self._save()
                    unsaved, saved_at = False, time.monotonic()
                if self.pos.offset >= self.seen_size:
                    # caught up with the file as it was read: what was written since waits for
                    # the next pump, in one batch, rather than going out a few lines a message
                    return sent
        finally:
            if unsaved:  # also when a later publish failed: these were acknowledged
                self._save()
