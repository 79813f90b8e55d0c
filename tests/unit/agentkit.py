"""Calling an in-process agent the way the bus does: a Command through ``dispatch``."""

from __future__ import annotations

from typing import Any

from corral.agent.daemon import dispatch
from corral.agent.state import AgentState
from corral.bus.codec import encode
from corral.bus.messages import Command, Reply


async def call(st: AgentState, verb: str, **args: Any) -> Reply:
    return await dispatch(st, encode(Command(verb=verb, args=args)))


async def ok(st: AgentState, verb: str, **args: Any) -> Any:
    reply = await call(st, verb, **args)
    assert reply.ok, reply.error
    return reply.result
