"""Agent calls that move disks between hosts (thin: the work is in :mod:`corral.agent.disks`).

The server drives a transfer as separate calls so that each is one step of an operation with
its own undo: the target prepares a slot (``disk_recv``), the source sends a live pass and then
a frozen one (``disk_send``), the target makes the copy its live disk (``disk_adopt``) or throws
it away (``disk_discard``). Bytes go host to host over the data channel, never via the server.
"""

from __future__ import annotations

from corral.agent.disks import HostDisks
from corral.agent.report import is_alive
from corral.agent.state import AgentState, Handler
from corral.agent.store import check_name
from corral.bus import rpc
from corral.errors import Conflict, InvalidRequest


def _disks(st: AgentState) -> HostDisks:
    if st.disks is None:
        raise InvalidRequest("this agent keeps no instance disks", hint="this is an agent bug")
    return st.disks


def _name(args: rpc.NameArgs) -> str:
    return check_name(args.name)


async def disk_recv(st: AgentState, args: rpc.SlotArgs) -> rpc.SlotTarget:
    disks, name = _disks(st), _name(args)
    out = await st.call(disks.recv_prepare, name, args.slot)
    return rpc.SlotTarget.model_validate(
        {**out, "address": disks.channel.host, "port": disks.port})


async def disk_send(st: AgentState, args: rpc.SendArgs) -> rpc.SendResult:
    disks, name = _disks(st), _name(args)
    target = args.target.model_dump()
    mode, keep_frozen = args.mode, args.keep_frozen
    async with st.lock(name):
        rec = st.records.get(name)
        freeze = thaw = None
        if rec is not None and mode == "frozen":
            await st.refresh(rec)
            if rec.state == "frozen" and not keep_frozen:
                raise Conflict(f"instance '{name}' is frozen by someone else",
                               hint=f"thaw it first ('corral thaw {name}')")
            if is_alive(rec):
                drv = st.driver(rec.driver)
                handle = rec.handle

                async def freeze() -> None:
                    await st.call(drv.freeze, handle)

                async def thaw() -> None:
                    await st.call(drv.thaw, handle)

        res = await disks.send(name, target, mode, args.gen, freeze, thaw, keep_frozen,
                               ticket=args.ticket, shape_only=args.shape_only)
        if rec is not None:
            await st.refresh(rec)
        return rpc.SendResult.model_validate(res.to_dict())


async def disk_discard(st: AgentState, args: rpc.SlotArgs) -> None:
    await st.call(_disks(st).discard, _name(args), args.slot)


async def disk_commit(st: AgentState, args: rpc.SlotArgs) -> None:
    """A pass into the slot completed: keep only what the next incremental pass needs."""
    await st.call(_disks(st).prune_received, _name(args), args.slot)


async def disk_adopt(st: AgentState, args: rpc.SlotArgs) -> rpc.DiskPath:
    disks, name = _disks(st), _name(args)
    async with st.lock(name):
        path = await st.call(disks.adopt, name, args.slot)
    return rpc.DiskPath(path=str(path))


async def disk_demote(st: AgentState, args: rpc.NameArgs) -> rpc.DiskPath:
    disks, name = _disks(st), _name(args)
    async with st.lock(name):
        if name in st.records:
            raise Conflict(f"instance '{name}' still exists on this host",
                           hint="delete it (keeping its disk) before demoting the disk")
        path = await st.call(disks.demote, name)
    return rpc.DiskPath(path=str(path))


HANDLERS: dict[str, Handler] = {
    "disk_recv": disk_recv,
    "disk_send": disk_send,
    "disk_discard": disk_discard,
    "disk_commit": disk_commit,
    "disk_adopt": disk_adopt,
    "disk_demote": disk_demote,
}
