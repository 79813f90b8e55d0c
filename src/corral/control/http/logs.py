"""``GET /v1/instances/{name}/logs``: an instance's captured lines as NDJSON, from JetStream.

Each request gets its own ordered consumer (ephemeral, in memory, no acks) on
``corral.logs.<name>``: from a start time for ``since``, else from the first line kept. One JSON
object per line goes out: ``{"ts", "host", "source", "seq", "line"}`` where ``seq`` is the
source's own line number. Without ``follow`` the response ends at the stream's end as it was when
the request came (the last message stored for that instance); with ``follow`` it stays open and
the consumer goes away with the client (and after ``inactive_threshold`` if the server dies).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import ValidationError

from corral.api.models import NAME_PATTERN, TAIL_SOURCE_PATTERN
from corral.api.timespec import parse_since
from corral.bus import streams, subjects
from corral.bus.messages import LogBatch
from corral.errors import HostUnavailable, InvalidRequest, NotFound

#: without follow, give up when the stream sends nothing for this long (lines aged out).
IDLE_END_SECONDS = 5.0
NDJSON = "application/x-ndjson"


def _not_found(name: str) -> NotFound:
    return NotFound(f"no logs for an instance named '{name}'",
                    hint="see 'corral ls' for instance names; lines appear once it wrote some")


def lines_of(batch: LogBatch, source: str | None) -> list[bytes]:
    """One NDJSON line per log line of ``batch`` (only ``source``'s when given). The fields the
    batch's lines share are encoded once: a ``json.dumps`` of a whole dict per line was the
    server's largest cost of a follower (15 us a line)."""
    if source is not None and batch.source != source:
        return []
    head = (f'{{"ts": {json.dumps(batch.ts)}, "host": {json.dumps(batch.host)}, '
            f'"source": {json.dumps(batch.source)}, "seq": ').encode()
    first = batch.first_seq
    return [b'%s%d, "line": %s}\n' % (head, first + i, json.dumps(line).encode())
            for i, line in enumerate(batch.lines)]


async def _last(js: Any, subject: str) -> tuple[int, float] | None:
    """(stream sequence, time) of the newest message on ``subject``, None when there is none."""
    from nats.js.errors import NotFoundError

    try:
        msg = await js.get_last_msg(streams.LOGS, subject)
    except NotFoundError:
        return None
    when = msg.time.timestamp() if isinstance(msg.time, datetime) else 0.0
    return int(msg.seq or 0), when


async def _subscribe(js: Any, subject: str, start: float | None) -> Any:
    if start is None:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0)
    else:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME,
                                opt_start_time=datetime.fromtimestamp(start, UTC),
                                inactive_threshold=30.0)
    return await js.subscribe(subject, stream=streams.LOGS, ordered_consumer=True,
                              config=config)


async def _stream(sub: Any, follow: bool, source: str | None,
                  end: int) -> AsyncIterator[bytes]:
    #: last line number sent per (host, source): a batch the agent sent again after a crash
    #: (same numbers) is shown once, as the sinks write it once.
    last: dict[str, int] = {}
    try:
        idle_since = time.monotonic()
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except TimeoutError:
                if not follow and time.monotonic() - idle_since > IDLE_END_SECONDS:
                    return
                continue
            idle_since = time.monotonic()
            try:
                batch = LogBatch.model_validate_json(msg.data)
            except ValidationError:
                continue
            key = batch.key
            skip = max(0, last.get(key, 0) + 1 - batch.first_seq)
            last[key] = max(last.get(key, 0), batch.first_seq + len(batch.lines) - 1)
            out = lines_of(batch, source)[skip:]
            if out:
                yield b"".join(out)
            if not follow and msg.metadata.sequence.stream >= end:
                return
    finally:
        with contextlib.suppress(Exception):  # the bus may be gone: the consumer expires
            await sub.unsubscribe()


def router(nc: Callable[[], Any], known: Callable[[str], bool],
           dependencies: Sequence[Any] = ()) -> APIRouter:
    """``nc()`` is the server's current NATS connection; ``known(name)`` says whether an
    instance of that name exists (its logs may outlive it)."""
    r = APIRouter(dependencies=list(dependencies), tags=["logs"])

    @r.get("/v1/instances/{name}/logs", response_class=StreamingResponse,
           responses={200: {"content": {NDJSON: {}},
                            "description": "one JSON object per line: ts, host, source, seq, "
                                           "line"}})
    async def logs(name: str, since: str | None = None, follow: bool = False,
                   source: Annotated[str | None, Query(  # the route words the refusal
                       json_schema_extra={"pattern": TAIL_SOURCE_PATTERN})] = None,
                   ) -> StreamingResponse:
        if not re.match(NAME_PATTERN, name):
            raise _not_found(name)
        if source is not None and not re.match(TAIL_SOURCE_PATTERN, source):
            raise InvalidRequest(f"source {source!r} is not a log source name",
                                 hint="stdout, stderr, or a name given with 'corral run --tail'")
        start = None if since is None else parse_since(since, time.time())
        conn = nc()
        if conn is None or not conn.is_connected:
            raise HostUnavailable("the server is not connected to the bus right now",
                                  hint="try again in a moment", retryable=True)
        js = conn.jetstream()
        subject = subjects.instance_logs(name)
        try:
            last = await _last(js, subject)
        except TimeoutError:  # a busy bus: say so before the answer begins, not a 500
            raise HostUnavailable("the bus did not answer in time", hint="try again in a "
                                  "moment", retryable=True) from None
        if last is None and not known(name):
            raise _not_found(name)
        if not follow and (last is None or (start is not None and last[1] < start)):
            async def nothing() -> AsyncIterator[bytes]:
                return
                yield b""
            return StreamingResponse(nothing(), media_type=NDJSON)
        end = last[0] if last else 0
        try:  # subscribed before the answer begins: a failure is still a clean 503
            sub = await _subscribe(js, subject, start)
        except TimeoutError:
            raise HostUnavailable("the bus did not answer in time", hint="try again in a "
                                  "moment", retryable=True) from None
        return StreamingResponse(_stream(sub, follow, source, end), media_type=NDJSON)

    return r

