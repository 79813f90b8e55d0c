"""Who really runs an instance: decide from what the hosts say, never from our records alone.

After a crash or a partition the server asks every reachable host what it runs. Each report
carries the instance's epoch (the fencing token handed out with every start, promote and
failover). For every instance the copy with the newest epoch is the one that may live; every
other running copy is stopped, and the record is corrected to where the winner really is. An
instance whose newest copy is on a host that did not answer is left alone (we cannot know what it
does), so reconciling never starts a second copy on its own.

Pure functions over snapshots, so every split-brain shape is a unit test.
"""

from __future__ import annotations

from dataclasses import dataclass

ALIVE = frozenset({"running", "frozen"})


@dataclass(frozen=True)
class Seen:
    """One copy of an instance as a host reported it."""

    host: str
    instance: str
    epoch: int
    state: str


@dataclass(frozen=True)
class Record:
    """What the server's database says."""

    instance: str
    host: str | None
    epoch: int


@dataclass(frozen=True)
class Stop:
    host: str
    instance: str
    epoch: int
    reason: str


@dataclass(frozen=True)
class Relocate:
    """The record points elsewhere than the copy that won: move the record, not the workload."""

    instance: str
    host: str
    epoch: int


@dataclass(frozen=True)
class Plan:
    stops: list[Stop]
    relocations: list[Relocate]
    unknown: list[str]  # instances whose recorded host did not answer and no copy was seen


def reconcile(records: list[Record], seen: list[Seen], answered: set[str]) -> Plan:
    by_instance: dict[str, list[Seen]] = {}
    for s in seen:
        by_instance.setdefault(s.instance, []).append(s)
    stops: list[Stop] = []
    moves: list[Relocate] = []
    unknown: list[str] = []
    recorded = {r.instance: r for r in records}
    for name in sorted(set(by_instance) | set(recorded)):
        copies = by_instance.get(name, [])
        rec = recorded.get(name)
        floor = rec.epoch if rec is not None else 0
        alive = [c for c in copies if c.state in ALIVE]
        newest = max((c.epoch for c in copies), default=-1)
        # a recorded epoch newer than every copy we saw means the winner is on a silent host
        winner_silent = rec is not None and rec.host not in answered and floor > newest
        if rec is None:
            stops += [Stop(c.host, name, c.epoch, "not in the database (deleted while away)")
                      for c in alive]
            continue
        if winner_silent:
            stops += [Stop(c.host, name, c.epoch, f"epoch {c.epoch} older than {floor}")
                      for c in alive]
            if not alive:
                unknown.append(name)
            continue
        if not alive:
            if rec.host is not None and rec.host not in answered:
                unknown.append(name)
            continue
        best = max(alive, key=lambda c: (c.epoch, c.host == rec.host))
        for c in alive:
            if c is not best:
                why = ("a second copy with the same epoch" if c.epoch == best.epoch
                       else f"epoch {c.epoch} older than {best.epoch} on {best.host}")
                stops.append(Stop(c.host, name, c.epoch, why))
        if best.epoch < floor:
            # even the best copy predates the record: fenced, but its host answered, so stop it
            stops.append(Stop(best.host, name, best.epoch, f"epoch {best.epoch} older than "
                                                           f"recorded {floor}"))
            continue
        if best.host != rec.host or best.epoch != rec.epoch:
            moves.append(Relocate(name, best.host, best.epoch))
    return Plan(stops, moves, unknown)
