"""Calling an agent: one verb of :data:`corral.bus.rpc.CALLS`, with that verb's timeout.

The server never invents a verb or a timeout at the call site; both come from the table, so the
agent's handler list and the server's calls cannot drift apart unnoticed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client
from pydantic import ValidationError

from corral.bus import subjects
from corral.bus.connect import request
from corral.bus.messages import Command, InstanceReport, Reply
from corral.bus.rpc import CALLS, call_timeout
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

    async def call(self, host: str, verb: str, args: dict[str, Any]) -> Any:
        """The ``result`` of ``verb`` on ``host``; the agent's own error when it fails.

        A long call (a disk pass may take hours) is not left waiting for its full timeout when
        the agent that took it died: if the host goes down or its agent joins again (a new
        process, which knows nothing of the call) the call fails at once, so the operation
        rolls back now instead of hours later."""
        if verb not in CALLS:  # a bug on the server side, never an operator's mistake
            raise CorralError(f"internal: '{verb}' is not an agent call")
        timeout = call_timeout(verb, args)
        pending = request(self.nc, subjects.command(host), Command(verb=verb, args=args),
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
                        f"the agent on {host} {why} during '{verb}'",
                        hint="the operation rolls back; check the host's agent log",
                        retryable=True)
        finally:
            if not task.done():
                task.cancel()

    async def report(self, host: str, verb: str, args: dict[str, Any]) -> InstanceReport:
        """A call whose result is an :class:`InstanceReport`."""
        result = await self.call(host, verb, args)
        try:
            return InstanceReport.model_validate(result)
        except ValidationError as exc:
            raise CorralError(
                f"agent on {host} answered '{verb}' with something that is not an instance "
                f"report: {exc.errors()[0].get('msg')}",
                hint="the agent and server versions may differ; upgrade both",
            ) from exc
