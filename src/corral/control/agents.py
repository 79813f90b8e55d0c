"""Calling an agent: one :class:`corral.bus.rpc.Call`, typed both ways, with its timeout.

The server never invents a verb or a timeout at the call site; both come from the table, so the
agent's handler list and the server's calls cannot drift apart unnoticed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client
from pydantic import BaseModel, ValidationError

from corral.bus import subjects
from corral.bus.connect import request
from corral.bus.messages import Command, Reply
from corral.bus.rpc import CALLS, A, Call, R, call_timeout
from corral.errors import CorralError, HostUnavailable

#: calls allowed longer than this are watched: see :meth:`AgentCaller.call`
WATCH_AFTER = 30.0
WATCH_EVERY = 0.5

#: what identifies one run of a host's agent: (joins so far, up or down)
Liveness = Callable[[str], tuple[int, str]]


class AgentCaller:
    def __init__(self, nc: Client, liveness: Liveness | None = None) -> None:
        self.nc = nc
        #: set by the server once it has a fleet; lets a long call notice its agent is gone
        self.liveness = liveness

    async def call(self, host: str, call: Call[A, R], args: A) -> R:
        """The result of ``call`` on ``host``, validated; the agent's own error when it fails.

        A long call (a disk pass may take hours) is not left waiting for its full timeout when
        the agent that took it died: if the host goes down or its agent joins again (a new
        process, which knows nothing of the call) the call fails at once, so the operation
        rolls back now instead of hours later."""
        if CALLS.get(call.verb) is not call:  # a bug on the server side, never the operator's
            raise CorralError(f"internal: '{call.verb}' is not an agent call")
        raw = await self._send(host, call, args)
        try:
            return call.parse(raw)
        except ValidationError as exc:
            raise CorralError(
                f"agent on {host} answered '{call.verb}' with something unexpected: "
                f"{exc.errors()[0].get('msg')}",
                hint="the agent and server versions may differ; upgrade both",
            ) from exc

    async def _send(self, host: str, call: Call[Any, Any], args: BaseModel) -> Any:
        timeout = call_timeout(call, args)
        wire = args.model_dump(mode="json", exclude_none=True)  # None is every field's default
        pending = request(self.nc, subjects.command(host), Command(verb=call.verb, args=wire),
                          Reply, timeout)
        if self.liveness is None or timeout <= WATCH_AFTER:
            return (await pending).result
        seen = self.liveness(host)
        task = asyncio.ensure_future(pending)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=WATCH_EVERY)
                if done:
                    return task.result().result
                now = self.liveness(host)
                if now != seen:
                    why = "went down" if now[1] != "up" else "restarted"
                    raise HostUnavailable(
                        f"the agent on {host} {why} during '{call.verb}'",
                        hint="the operation rolls back; check the host's agent log",
                        retryable=True)
        finally:
            if not task.done():
                task.cancel()
