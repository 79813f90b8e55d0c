"""How often the fleet's agents heartbeat and sample, and how long a lease runs, for a fleet
of a given size: the leader answers every heartbeat and takes every sample on one event loop,
so a fixed period makes its load grow with the host count until it falls behind, every lease
lapses and every host is marked down at once (bench/fleet_scale.py: 2000 hosts at a 2 s
heartbeat). Like Nomad's ``max_heartbeats_per_second``, the period grows past the settings
once ``hosts / heartbeat_seconds`` would exceed the budget, and the lease and the sample
period grow in the same proportion, so the timing rules (config.timing_problems) still hold.

Safety across a change of pace: a lease granted is never cut short by a later, shorter one
(the fleet keeps the later of the two ends), and every lease ever granted is at most the
*ceiling* kept in the database before it is first granted; a server that takes over gives
every host a fresh lease of at least that ceiling, so no agent holds a lease past the one the
new leader counts (docs/configuration.md, "Heartbeats in a large fleet")."""

from __future__ import annotations

from dataclasses import dataclass

from corral.config import Settings

#: the pace changes only when it would move by more than this share, so a fleet that grows
#: one host at a time does not tell every agent a new period at every step
HYSTERESIS = 0.1


@dataclass(frozen=True)
class Pace:
    heartbeat_seconds: float
    lease_seconds: float
    sample_seconds: float
    #: how many times the settings' periods (1.0: the settings as they are)
    factor: float = 1.0


def pace_for(settings: Settings, hosts: int) -> Pace:
    """The pace for a fleet of ``hosts``: the settings' own below the budget
    (``max_heartbeats_per_second``; 0 = no budget), stretched in proportion above it."""
    budget = settings.max_heartbeats_per_second
    factor = 1.0
    if budget > 0 and hosts > 0:
        factor = max(1.0, hosts / budget / settings.heartbeat_seconds)
    return Pace(heartbeat_seconds=settings.heartbeat_seconds * factor,
                lease_seconds=settings.lease_seconds * factor,
                sample_seconds=settings.sample_seconds * factor, factor=factor)


def repace(current: Pace, settings: Settings, hosts: int) -> Pace:
    """:func:`pace_for`, or ``current`` when that is within :data:`HYSTERESIS` of it (and
    both stretch the settings, or both do not)."""
    new = pace_for(settings, hosts)
    if new.factor == current.factor:
        return current
    if new.factor > 1.0 and current.factor > 1.0 and (
            abs(new.factor - current.factor) <= HYSTERESIS * current.factor):
        return current
    return new
