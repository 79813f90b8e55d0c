"""One lock manager for everything that must not overlap: verbs, operations, background loops.

Before, three mechanisms did this: a set of busy instance names on the fleet, a lock per target
inside the engine, and a database query for the unfinished operation of a target. They could
disagree (a verb checked the set, an operation the query), and none could say *who* held what.
Here every holder takes all the resources it needs at once, or none, under a name that says who
it is; a refusal names the holder, so "busy" always comes with "busy with what".

Resources are strings (``instance:web``, ``host:host2``). Exclusive holds exclude everything;
shared holds (a migration's source and target hosts) exclude only exclusive ones, so a future
``host rm`` or drain can wait for every operation that touches the host while operations on
different instances of one host still run side by side. In memory only: after a server restart,
unfinished operations take their locks again before anything else may start.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field

from corral.errors import Busy


def instance(name: str) -> str:
    return f"instance:{name}"


def host(name: str) -> str:
    return f"host:{name}"


@dataclass(frozen=True)
class LockSet:
    """What one holder takes: resources it alone may hold, and ones it shares."""

    exclusive: frozenset[str] = frozenset()
    shared: frozenset[str] = frozenset()

    @classmethod
    def of(cls, exclusive: Iterable[str] = (), shared: Iterable[str] = ()) -> LockSet:
        ex = frozenset(exclusive)
        return cls(ex, frozenset(shared) - ex)


@dataclass
class _Held:
    what: str
    locks: LockSet
    exclusive: set[str] = field(default_factory=set)


class LockManager:
    def __init__(self) -> None:
        self._owners: dict[str, _Held] = {}
        self._exclusive: dict[str, str] = {}  # resource -> owner
        self._shared: dict[str, set[str]] = {}  # resource -> owners

    def take(self, owner: str, locks: LockSet, what: str = "") -> None:
        """Take every resource of ``locks`` for ``owner``, or none and raise :class:`Busy`
        naming who holds the first one that is taken. Taking again what one already holds
        is allowed (an owner's own second request)."""
        for res in sorted(locks.exclusive | locks.shared):
            holder = self._blocker(owner, res, res in locks.exclusive)
            if holder is not None:
                kind, _, name = res.partition(":")
                raise Busy(f"{kind} '{name}' is busy with {self._owners[holder].what}",
                           hint="wait for it to finish (see 'corral ops ls'), then try again",
                           details={"resource": res, "holder": holder})
        held = self._owners.setdefault(owner, _Held(what or owner, LockSet()))
        for res in locks.exclusive:
            self._exclusive[res] = owner
        for res in locks.shared:
            self._shared.setdefault(res, set()).add(owner)
        held.locks = LockSet.of(held.locks.exclusive | locks.exclusive,
                                held.locks.shared | locks.shared)

    def _blocker(self, owner: str, res: str, exclusive: bool) -> str | None:
        ex = self._exclusive.get(res)
        if ex is not None and ex != owner:
            return ex
        if exclusive:
            others = self._shared.get(res, set()) - {owner}
            if others:
                return min(others)
        return None

    def release(self, owner: str) -> None:
        """Give back everything ``owner`` holds (idempotent)."""
        held = self._owners.pop(owner, None)
        if held is None:
            return
        for res in held.locks.exclusive:
            if self._exclusive.get(res) == owner:
                del self._exclusive[res]
        for res in held.locks.shared:
            owners = self._shared.get(res)
            if owners is not None:
                owners.discard(owner)
                if not owners:
                    del self._shared[res]

    @contextlib.contextmanager
    def holding(self, owner: str, locks: LockSet, what: str = "") -> Iterator[None]:
        self.take(owner, locks, what)
        try:
            yield
        finally:
            self.release(owner)

    def busy(self, res: str) -> bool:
        return res in self._exclusive or bool(self._shared.get(res))

    def holder(self, res: str) -> str | None:
        """Who holds ``res`` exclusively, else one of its sharers (None: free)."""
        ex = self._exclusive.get(res)
        if ex is not None:
            return ex
        shared = self._shared.get(res)
        return min(shared) if shared else None

    @property
    def instances(self) -> Collection[str]:
        """The names of instances something holds (``name in locks.instances``)."""
        return _Names(self, "instance")


class _Names(Collection[str]):
    def __init__(self, locks: LockManager, kind: str) -> None:
        self._locks, self._prefix = locks, f"{kind}:"

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._locks.busy(self._prefix + name)

    def _all(self) -> set[str]:
        held = set(self._locks._exclusive) | set(self._locks._shared)
        return {r[len(self._prefix):] for r in held if r.startswith(self._prefix)}

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._all()))

    def __len__(self) -> int:
        return len(self._all())
