"""A durable log sink: JetStream -> one file per instance and source, no line lost or doubled.

Exactly-once on disk without a database: after each fetched batch the sink fsyncs the files it
appended to, then atomically replaces a checkpoint holding the stream sequence it reached, each
file's length, and the last line number per source. On start it cuts every file back to its
checkpointed length (whatever was appended after the last checkpoint is written again) and asks
JetStream for messages after the checkpointed sequence. A kill -9 at any instant therefore
replays exactly what was not checkpointed.

Line numbers are per source (host, instance, stream), set by the agent; a jump is a gap (lines
that never reached the bus, or aged out of it) and is recorded in ``gaps.jsonl`` and counted,
never papered over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from corral.bus import streams, subjects
from corral.bus.identity import READER, Credentials
from corral.bus.messages import LogBatch

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def _safe(part: str) -> str:
    return _SAFE.sub("_", part) or "_"


def _split_run(key: str) -> tuple[str, str]:
    """(source, run) of a :attr:`LogBatch.key`: host/instance/source[/run] (none has a '/')."""
    parts = key.split("/")
    if len(parts) == 4:
        return "/".join(parts[:3]), parts[3]
    return key, ""


@dataclass
class Checkpoint:
    stream_seq: int = 0
    lengths: dict[str, int] = field(default_factory=dict)
    last_line: dict[str, int] = field(default_factory=dict)
    gaps: int = 0
    bad: int = 0

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        return cls(raw["stream_seq"], raw["lengths"], raw["last_line"], raw.get("gaps", 0),
                   raw.get("bad", 0))

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as fh:
            json.dump(self.__dict__, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


#: runs of one source (host, instance, stream) whose last line number the checkpoint keeps, the
#: most recently written last. A copy that comes back to a host starts a new run, so a few are
#: legitimate; ``run`` is the host's to choose, and without a cap a host sending each batch
#: under a new run grew the checkpoint (rewritten after every batch) without end. A run pushed
#: out that writes again counts from nothing (a gap is recorded if it does not start at 1).
RUNS_PER_SOURCE = 8

#: files a sink keeps open at once; the least recently written is closed (after an fsync, so
#: the next checkpoint may vouch for it) and opened again when a line comes for it. One file
#: per instance and source used to stay open for ever: EMFILE after ~500 instances.
MAX_OPEN = 256


class LogSink:
    def __init__(self, directory: Path, name: str, batch: int = 256,
                 max_open: int = MAX_OPEN) -> None:
        self.dir = Path(directory)
        self.name = _safe(name)
        self.batch = batch
        self.state_path = self.dir / f".sink-{self.name}.json"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cp = Checkpoint.load(self.state_path)
        self._files: OrderedDict[str, Any] = OrderedDict()
        self.max_open = max_open
        self.written = 0
        #: source -> its runs' keys in the checkpoint, least recently written first
        self._runs: dict[str, list[str]] = {}
        for key in self.cp.last_line:
            base, run = _split_run(key)
            if run:
                self._runs.setdefault(base, []).append(key)
        self._restore()

    def _restore(self) -> None:
        """Cut every file back to what the checkpoint vouches for -- a file it does not list
        yet (written, then killed before its first checkpoint) to nothing: replaying from the
        checkpointed sequence writes it again."""
        for path in self.dir.glob("*/*.log"):
            rel = path.relative_to(self.dir).as_posix()
            length = self.cp.lengths.get(rel, 0)
            if path.stat().st_size > length:
                with path.open("r+b") as fh:
                    fh.truncate(length)
                    os.fsync(fh.fileno())

    def _file(self, rel: str) -> Any:
        fh = self._files.get(rel)
        if fh is not None:
            self._files.move_to_end(rel)
            return fh
        while len(self._files) >= self.max_open:
            _, old = self._files.popitem(last=False)
            old.flush()
            os.fsync(old.fileno())  # the checkpoint will not see it again: durable now
            old.close()
        path = self.dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = self._files[rel] = path.open("ab")
        return fh

    def apply(self, stream_seq: int, raw: bytes, subject: str | None = None) -> None:
        """Write one message's new lines (idempotent against the checkpoint). With the
        ``subject`` it came on, a batch that claims another host or instance than the one the
        bus let publish it is dropped as bad."""
        if stream_seq <= self.cp.stream_seq:
            return
        self.cp.stream_seq = stream_seq
        try:
            batch = LogBatch.model_validate_json(raw)
            if subject is not None and subjects.logs_origin(subject) != (batch.host,
                                                                           batch.instance):
                raise ValueError(f"a batch of {batch.host}/{batch.instance} on {subject}")
        except (ValidationError, ValueError) as exc:
            self.cp.bad += 1
            log.warning("sink %s: message %d is not a log batch of its subject: %s",
                        self.name, stream_seq, str(exc)[:200])
            return
        key = batch.key
        last = self.cp.last_line.get(key, 0)
        if batch.first_seq > last + 1:
            self._gap(key, last + 1, batch.first_seq - 1)
        skip = max(0, last + 1 - batch.first_seq)
        lines = batch.lines[skip:]
        if not lines:
            return
        rel = f"{_safe(batch.instance)}/{_safe(batch.source)}.log"
        fh = self._file(rel)
        fh.write("".join(line.rstrip("\n") + "\n" for line in lines).encode())
        self.cp.lengths[rel] = fh.tell()
        self._note(key, batch.run, batch.first_seq + len(batch.lines) - 1)
        self.written += len(lines)

    def _note(self, key: str, run: str, last: int) -> None:
        """Record a source's last line, keeping at most :data:`RUNS_PER_SOURCE` runs of it."""
        lines = self.cp.last_line
        lines.pop(key, None)
        lines[key] = last  # dicts keep order, in memory and in the checkpoint's JSON
        if not run:
            return
        runs = self._runs.setdefault(_split_run(key)[0], [])
        if key in runs:
            runs.remove(key)
        runs.append(key)
        while len(runs) > RUNS_PER_SOURCE:
            lines.pop(runs.pop(0), None)

    def _gap(self, key: str, first: int, last: int) -> None:
        self.cp.gaps += 1
        log.warning("sink %s: lines %d-%d of %s never arrived", self.name, first, last, key)
        with (self.dir / "gaps.jsonl").open("a") as fh:
            fh.write(json.dumps({"source": key, "first": first, "last": last,
                                 "seen_at": time.time()}) + "\n")

    def checkpoint(self) -> None:
        for fh in self._files.values():
            fh.flush()
            os.fsync(fh.fileno())
        self.cp.save(self.state_path)

    def close(self) -> None:
        for fh in self._files.values():
            with contextlib.suppress(OSError):
                fh.close()
        self._files.clear()

    async def run(self, nc: Any, stop: asyncio.Event | None = None,
                  idle_timeout: float = 1.0) -> None:
        """Consume until ``stop`` is set. The durable consumer is recreated at the checkpoint, so
        JetStream's idea of our position never overrides the files' own."""
        js = nc.jetstream()
        try:
            await js.stream_info(streams.LOGS)  # the server made it; a reader changes nothing
        except NotFoundError:  # a bus of its own (tools, tests): make it
            await streams.ensure(js, streams.logs_config())
        durable = f"sink-{self.name}"
        with contextlib.suppress(Exception):
            await js.delete_consumer(streams.LOGS, durable)
        config = ConsumerConfig(
            durable_name=durable,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.cp.stream_seq + 1,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30.0,
            max_ack_pending=self.batch * 4,
        )
        sub = await js.pull_subscribe(subjects.LOGS_ALL, durable=durable, stream=streams.LOGS,
                                      config=config)
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                msgs = await sub.fetch(self.batch, timeout=idle_timeout)
            except TimeoutError:
                continue
            for msg in msgs:
                self.apply(msg.metadata.sequence.stream, msg.data, msg.subject)
            self.checkpoint()
            for msg in msgs:
                await msg.ack()


def reader(token: str, ca_file: str = "") -> Credentials:
    """A sink's login on a fleet's bus: the reader user, with the fleet's token."""
    return Credentials(token=token, user=READER, ca_file=ca_file)


async def serve(url: str, creds: Credentials, directory: Path, name: str) -> None:
    """Run one sink until SIGTERM/SIGINT (``corral logsink``). On a fleet's bus it logs in as
    the reader (:data:`corral.bus.identity.READER`, the fleet token as password), which may
    read the log stream and change nothing."""
    import signal

    import nats

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    nc = await nats.connect(url, name=f"corral-logsink-{name}", max_reconnect_attempts=-1,
                            reconnect_time_wait=0.5, **creds.options())
    sink = LogSink(directory, name)
    try:
        while not stop.is_set():
            try:
                await sink.run(nc, stop)
            except Exception as exc:  # the bus went away: keep the files, try again
                if stop.is_set():
                    break
                log.warning("sink %s: %s; retrying", name, exc)
                await asyncio.sleep(1.0)
    finally:
        sink.checkpoint()
        sink.close()
        with contextlib.suppress(Exception):
            await nc.close()


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="corral-logsink")
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--name", default="default")
    ap.add_argument("--nats", required=True)
    ap.add_argument("--token-file", type=Path, required=True)
    ap.add_argument("--user", default="", help="log in as this user, the token as password")
    ap.add_argument("--ca-file", default="", help="the bus's CA (tls:// URLs)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    creds = Credentials(token=args.token_file.read_text().strip(), user=args.user,
                        ca_file=args.ca_file)
    asyncio.run(serve(args.nats, creds, args.dir, args.name))


if __name__ == "__main__":
    main()
