"""Calling an agent: one verb of :data:`corral.bus.rpc.CALLS`, with that verb's timeout.

The server never invents a verb or a timeout at the call site; both come from the table, so the
agent's handler list and the server's calls cannot drift apart unnoticed.
"""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client
from pydantic import ValidationError

from corral.bus import subjects
from corral.bus.connect import request
from corral.bus.messages import Command, InstanceReport, Reply
from corral.bus.rpc import CALLS, call_timeout
from corral.errors import CorralError


class AgentCaller:
    def __init__(self, nc: Client) -> None:
        self.nc = nc

    async def call(self, host: str, verb: str, args: dict[str, Any]) -> Any:
        """The ``result`` of ``verb`` on ``host``; the agent's own error when it fails."""
        if verb not in CALLS:  # a bug on the server side, never an operator's mistake
            raise CorralError(f"internal: '{verb}' is not an agent call")
        reply = await request(self.nc, subjects.command(host), Command(verb=verb, args=args),
                              Reply, call_timeout(verb, args))
        return reply.result

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
