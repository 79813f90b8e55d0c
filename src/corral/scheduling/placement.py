"""Where a new instance goes: pure functions over a snapshot of the fleet.

Nothing here touches the database or the bus, so every rule is tested with plain values. The
caller builds :class:`HostSnapshot` objects from committed state (reservations count every
instance that is not deleted: a stopped instance keeps its CPU and memory, so starting it again
never fails for lack of room) and passes the result to the agent.

The rule is "spread": among the hosts that are up, offer the driver and fit, take the one with
the largest share of its CPU still free (ties: most free memory share, then name), which keeps
load even and leaves every host some headroom. A request may carry a ``prefer`` score per host
(unshelve: the share of the shelved disk's chunks a host already caches, 0..1); among the hosts
that fit, a higher score wins before spreading, compared in steps of :data:`PREFER_STEP` so a
sampling wobble (0.51 against 0.50) does not override the spread. When nothing fits,
:class:`NoCapacity` names what each host lacks, so the operator can tell "make it smaller" from
"start another agent".
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from corral.errors import NoCapacity

#: Rounding slack so that 0.1 + 0.2 cores still "fit" in 0.3.
EPSILON = 1e-9
#: preference scores are compared in steps of this size (see the module doc)
PREFER_STEP = 0.1


@dataclass(frozen=True)
class HostSnapshot:
    name: str
    up: bool
    cores: int
    memory_bytes: int
    reserved_cpus: float = 0.0
    reserved_memory: int = 0
    drivers: frozenset[str] = frozenset()
    #: ``corral host drain``: takes nothing new, pinned or not
    draining: bool = False

    @property
    def free_cpus(self) -> float:
        return self.cores - self.reserved_cpus

    @property
    def free_memory(self) -> int:
        return self.memory_bytes - self.reserved_memory

    @property
    def free_cpu_share(self) -> float:
        return self.free_cpus / self.cores if self.cores > 0 else 0.0

    @property
    def free_memory_share(self) -> float:
        return self.free_memory / self.memory_bytes if self.memory_bytes > 0 else 0.0


@dataclass(frozen=True)
class Request:
    cpus: float
    memory_bytes: int
    driver: str
    #: pin to this host (it must still be up, offer the driver and fit)
    host: str | None = None
    #: hosts not to use (anti-affinity: where the primary of a standby runs; for a migration,
    #: its source and the host holding its standby)
    avoid: frozenset[str] = field(default_factory=frozenset)
    #: host -> preference score (higher first; missing means 0), e.g. share of chunks cached
    prefer: Mapping[str, float] = field(default_factory=dict)

    def preference(self, host: str) -> int:
        """The host's score in whole :data:`PREFER_STEP` steps (what the ordering uses)."""
        return round(self.prefer.get(host, 0.0) / PREFER_STEP)


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if abs(n) >= 1024**3 else f"{n / 1024**2:.0f} MiB"


def why_not(req: Request, host: HostSnapshot) -> str | None:
    """None when ``host`` can take ``req``, else a short reason (one per problem, '; '-joined)."""
    if req.host is not None and host.name != req.host:
        return f"not the requested host {req.host}"
    if host.name in req.avoid:
        return "excluded (anti-affinity)"
    if not host.up:
        return "down"
    if host.draining:
        return "draining"
    if req.driver not in host.drivers:
        return f"no {req.driver} driver"
    short: list[str] = []
    if req.cpus > host.free_cpus + EPSILON:
        short.append(f"needs {req.cpus:g} cpus, {max(host.free_cpus, 0.0):g} free")
    if req.memory_bytes > host.free_memory:
        short.append(f"needs {_gib(req.memory_bytes)} memory, "
                     f"{_gib(max(host.free_memory, 0))} free")
    return ", ".join(short) or None


def fits(req: Request, host: HostSnapshot) -> bool:
    return why_not(req, host) is None


def candidates(req: Request, hosts: Iterable[HostSnapshot]) -> list[HostSnapshot]:
    """Hosts that can take ``req``, best first."""
    ok = [h for h in hosts if fits(req, h)]
    return sorted(ok, key=lambda h: (-req.preference(h.name), -h.free_cpu_share,
                                     -h.free_memory_share, h.name))


def place(req: Request, hosts: Sequence[HostSnapshot]) -> str:
    """The name of the host ``req`` should go to; :class:`NoCapacity` when there is none."""
    best = candidates(req, hosts)
    if best:
        return best[0].name
    raise no_capacity(req, hosts)


def no_capacity(req: Request, hosts: Sequence[HostSnapshot]) -> NoCapacity:
    if req.host is not None:
        pinned = [h for h in hosts if h.name == req.host]
        hosts = pinned
        if not pinned:
            return NoCapacity(
                f"no host named {req.host}",
                hint="see 'corral host ls' for the hosts that joined",
                details={"shortfall": {req.host: "no such host"}},
            )
    if not hosts:
        return NoCapacity(
            "no host has joined the fleet yet",
            hint="start an agent ('corral agent') or a local fleet ('corral up')",
            details={"shortfall": {}},
        )
    shortfall = {h.name: why_not(req, h) or "fits" for h in sorted(hosts, key=lambda h: h.name)}
    summary = "; ".join(f"{name}: {reason}" for name, reason in shortfall.items())
    return NoCapacity(
        f"no host can take {req.cpus:g} cpus and {_gib(req.memory_bytes)} "
        f"with the {req.driver} driver: {summary}",
        hint="ask for less, remove or stop-and-remove instances, or add a host",
        details={"shortfall": shortfall},
    )


class Placer:
    """Many placements over one snapshot, each seeing the reservations of the ones before:
    for each request the choice :func:`place` would make over the snapshot as updated by
    the previous ones, without sorting every host each time (a batch of creates at 1000
    hosts sorted 1000 hosts per instance). The hosts that could take anything stay in the
    spread's order; a placement takes the first that fits and moves only that host."""

    def __init__(self, hosts: Sequence[HostSnapshot]) -> None:
        self.hosts = {h.name: h for h in hosts}
        self._order = sorted(self._key(h) for h in hosts if h.up and not h.draining)

    @staticmethod
    def _key(h: HostSnapshot) -> tuple[float, float, str]:
        return -h.free_cpu_share, -h.free_memory_share, h.name

    def place(self, req: Request) -> str:
        """The host for ``req``, its reservation counted from here on; NoCapacity as
        :func:`place` says it."""
        if req.host is not None or req.avoid or req.prefer:
            name = place(req, list(self.hosts.values()))
        else:
            hosts = self.hosts
            found = next((k[2] for k in self._order if fits(req, hosts[k[2]])), None)
            if found is None:
                raise no_capacity(req, list(hosts.values()))
            name = found
        self._take(name, req)
        return name

    def _take(self, name: str, req: Request) -> None:
        old = self.hosts[name]
        new = replace(old, reserved_cpus=old.reserved_cpus + req.cpus,
                      reserved_memory=old.reserved_memory + req.memory_bytes)
        self.hosts[name] = new
        if old.up and not old.draining:
            key = self._key(old)
            del self._order[bisect.bisect_left(self._order, key)]
            bisect.insort(self._order, self._key(new))
