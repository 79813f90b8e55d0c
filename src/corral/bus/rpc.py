"""Server -> agent calls, declared in one table with a timeout each (Ganeti's rpc_defs).

The server never sends a verb that is not listed here, and the agent registers exactly one handler
per listed verb; a test checks both sides agree. ``args`` documents the keys each call takes;
every call answers with :class:`corral.bus.messages.Reply`, whose ``result`` is described too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Call:
    verb: str
    timeout: float
    args: tuple[str, ...]
    result: str
    doc: str


CALLS: dict[str, Call] = {
    c.verb: c
    for c in (
        Call("create", 120.0, ("spec", "fresh"), "InstanceReport",
             "prepare an instance from a WireSpec (bundle, its disk); does not start it; a "
             "disk already at DISK_ROOT/NAME is used, unless fresh (a new instance): then it "
             "is set aside"),
        Call("start", 60.0, ("name", "epoch"), "InstanceReport", "start or start again"),
        Call("stop", 90.0, ("name", "timeout"), "InstanceReport",
             "SIGTERM, then SIGKILL after timeout seconds (the call's timeout covers it)"),
        Call("kill", 15.0, ("name", "signal", "if_epoch"), "InstanceReport",
             "send a signal to the whole tree (only to the copy at if_epoch, when given)"),
        Call("freeze", 15.0, ("name",), "InstanceReport", "freeze with the cgroup freezer"),
        Call("thaw", 15.0, ("name",), "InstanceReport", "thaw a frozen instance"),
        Call("delete", 60.0, ("name", "keep_disk", "set_aside", "if_epoch"), "null",
             "remove an instance that is not alive, and its disk unless keep_disk (set_aside:"
             " keep it in DISK_ROOT/.orphaned instead); if_epoch: only that copy"),
        Call("status", 10.0, ("name",), "InstanceReport", "what the driver sees now"),
        Call("list", 10.0, (), "list[InstanceReport]", "every instance the agent holds"),
        Call("disk_recv", 60.0, ("name", "slot"), "dict",
             "make a slot (incoming|standby) ready to receive a disk; where to send it"),
        Call("disk_send", 6 * 3600.0, ("name", "target", "mode", "gen", "keep_frozen"), "dict",
             "one pass of the disk to another host's slot: live, or frozen (the short one)"),
        Call("disk_discard", 120.0, ("name", "slot"), "null", "remove a slot's copy"),
        Call("disk_commit", 60.0, ("name", "slot"), "null",
             "a pass completed: keep only what the next incremental pass needs"),
        Call("disk_adopt", 120.0, ("name", "slot"), "dict",
             "the slot's copy becomes this host's live disk of the instance"),
        Call("disk_demote", 120.0, ("name",), "dict",
             "this host's live disk (no instance left here) becomes its standby copy"),
        Call("disk_push", 3600.0, ("name", "image"), "dict",
             "shelve: chunk the stopped instance's disk, upload what the store lacks, name it"),
        Call("disk_pull", 3600.0, ("name", "image", "replace"), "dict",
             "unshelve: build DISK_ROOT/NAME from a shelved manifest (kept if already there)"),
        Call("disk_drop", 120.0, ("name",), "dict",
             "remove a kept (shelved) disk; refused while an instance here uses it"),
        Call("chunks_cached", 10.0, ("ids",), "dict",
             "how many of these chunk ids this host's cache holds (unshelve placement)"),
    )
}


def call_timeout(verb: str, args: dict[str, object] | None = None) -> float:
    """The reply timeout for ``verb``; a stop also waits for its own grace period."""
    base = CALLS[verb].timeout
    if verb == "stop" and args is not None:
        grace = args.get("timeout")
        if isinstance(grace, (int, float)):
            base = max(base, float(grace) + 30.0)
    return base
