"""``corral apply``'s plan: a pure function of the fleet file and the live fleet.

What the API lets change, and so what each difference costs:
- nothing of an instance can be changed in place (the API has no update route): a changed
  command, image, driver, rootfs, size, VIP, tail, restart policy or check is a **recreate**
  (stop, rm, create: its disk starts empty), done only with ``--yes``;
- a changed host pin is a **migrate** (the disk moves with it);
- a standby is added, removed or replaced (rm + add) with ``corral standby``'s calls.
Instances the file does not list are never touched: the API has no labels to mark what
apply made, so it cannot tell its own from an operator's; they are listed as unmanaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from corral.api.models import CreateInstance, InstanceView, StandbyView
from corral.api.spec import FleetSpec, InstanceEntry

#: action -> what it does, in the order they run
ACTIONS = ("create", "recreate", "migrate", "standby-add", "standby-replace", "standby-rm")


class Change:
    """One line of the plan: an action on an instance and the fields behind it."""

    __slots__ = ("action", "diffs", "entry", "name")

    def __init__(self, action: str, name: str, diffs: list[tuple[str, Any, Any]],
                 entry: InstanceEntry | None = None) -> None:
        self.action = action
        self.name = name
        self.diffs = diffs  # (field, now, wanted)
        self.entry = entry

    def as_dict(self) -> dict[str, Any]:
        return {"action": self.action, "instance": self.name,
                "changes": [{"field": f, "from": a, "to": b} for f, a, b in self.diffs]}


class Plan:
    __slots__ = ("changes", "unmanaged")

    def __init__(self, changes: list[Change], unmanaged: list[str]) -> None:
        self.changes = changes
        self.unmanaged = unmanaged

    @property
    def recreates(self) -> list[str]:
        return [c.name for c in self.changes if c.action == "recreate"]

    def as_dict(self) -> dict[str, Any]:
        return {"changes": [c.as_dict() for c in self.changes], "unmanaged": self.unmanaged,
                "note": "apply never deletes: instances not in the file are left alone"}


def wanted_argv(req: CreateInstance) -> list[str] | None:
    """The argv the server will run, when it does not depend on an image's config (None)."""
    if req.entrypoint is not None:
        return list(req.entrypoint) + list(req.command)
    if req.image is None:
        return list(req.command)
    return None


def instance_diffs(req: CreateInstance, view: InstanceView) -> list[tuple[str, Any, Any]]:
    """Fields of ``view`` that differ from ``req`` and need a recreate."""
    diffs: list[tuple[str, Any, Any]] = []

    def cmp(field: str, now: Any, want: Any) -> None:
        if now != want:
            diffs.append((field, now, want))

    argv = wanted_argv(req)
    if argv is not None:
        cmp("command", list(view.command), argv)
    cmp("driver", view.driver, req.driver)
    cmp("image", view.image, req.image)
    cmp("rootfs", view.rootfs, req.rootfs)
    if abs(view.cpus - req.cpus) > 1e-9:
        diffs.append(("cpus", view.cpus, req.cpus))
    cmp("memory_bytes", view.memory_bytes, req.memory_bytes)
    cmp("vip", view.vip, req.vip)
    cmp("tail", dict(view.tail), dict(req.tail))
    now_r = view.restart.model_dump() if view.restart.mode != "no" else None
    want_r = req.restart.model_dump() if req.restart.mode != "no" else None
    cmp("restart", now_r, want_r)
    cmp("check", view.check.model_dump() if view.check else None,
        req.check.model_dump() if req.check else None)
    return diffs


def _standby(entry: InstanceEntry, sb: StandbyView | None) -> Change | None:
    want = entry.standby
    if want is None:
        return None if sb is None else Change("standby-rm", entry.name, [
            ("standby", {"host": sb.host, "every": sb.every_seconds}, None)])
    wanted = {"host": want.host, "every": float(want.every)}
    if sb is None:
        return Change("standby-add", entry.name, [("standby", None, wanted)], entry)
    now = {"host": sb.host, "every": sb.every_seconds}
    host_ok = want.host is None or want.host == sb.host
    if host_ok and abs(sb.every_seconds - float(want.every)) < 1e-9:
        return None
    return Change("standby-replace", entry.name, [("standby", now, wanted)], entry)


def plan(spec: FleetSpec, views: Sequence[InstanceView], standbys: Sequence[StandbyView]
         ) -> Plan:
    """The changes that make the fleet match ``spec`` (an empty list: it already does)."""
    live = {v.name: v for v in views}
    sbs = {s.instance: s for s in standbys}
    changes: list[Change] = []
    for entry in spec.instance:
        req = entry.request()
        view = live.get(entry.name)
        if view is None:
            changes.append(Change("create", entry.name, [("instance", None, "new")], entry))
            if entry.standby is not None:
                changes.append(Change("standby-add", entry.name, [
                    ("standby", None, {"host": entry.standby.host,
                                       "every": float(entry.standby.every)})], entry))
            continue
        diffs = instance_diffs(req, view)
        recreated = bool(diffs)
        if diffs:
            changes.append(Change("recreate", entry.name, diffs, entry))
        elif req.host is not None and view.host not in (None, req.host):  # None: shelved
            changes.append(Change("migrate", entry.name, [("host", view.host, req.host)],
                                  entry))
        # a recreated instance loses its standby with its row: add it again
        sc = _standby(entry, None if recreated else sbs.get(entry.name))
        if sc is not None:
            changes.append(sc)
    changes.sort(key=lambda c: ACTIONS.index(c.action))
    listed = {e.name for e in spec.instance}
    return Plan(changes, sorted(n for n in live if n not in listed))
