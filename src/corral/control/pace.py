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


def pace_for(settings: Settings, hosts: int, instances: int = 0) -> Pace:
    """The pace for a fleet of ``hosts`` running ``instances``: the settings' own below the
    budget (``max_heartbeats_per_second``; 0 = no budget), stretched in proportion above it.
    Samples also keep within ``max_instance_samples_per_second`` (each carries every instance
    of its host: a dense fleet's samples were most of what the leader read, and at 1000 hosts
    and 30,000 instances it fell so far behind that the bus cut it off as a slow consumer),
    but never further apart than half a lease (the last sample counts as fresh for a lease)."""
    budget = settings.max_heartbeats_per_second
    factor = 1.0
    if budget > 0 and hosts > 0:
        factor = max(1.0, hosts / budget / settings.heartbeat_seconds)
    lease = settings.lease_seconds * factor
    sample = settings.sample_seconds * factor
    figures = settings.max_instance_samples_per_second
    if figures > 0 and instances > 0:
        sample = max(sample, min(instances / figures, lease / 2))
    return Pace(heartbeat_seconds=settings.heartbeat_seconds * factor, lease_seconds=lease,
                sample_seconds=sample, factor=factor)


def _near(new: float, old: float) -> bool:
    return abs(new - old) <= HYSTERESIS * old


def repace(current: Pace, settings: Settings, hosts: int, instances: int = 0) -> Pace:
    """:func:`pace_for`, or ``current`` when that is within :data:`HYSTERESIS` of it (and
    both stretch the settings, or both do not; the same for the sample period)."""
    new = pace_for(settings, hosts, instances)
    if new == current:
        return current
    same_factor = new.factor == current.factor or (
        new.factor > 1.0 and current.factor > 1.0 and _near(new.factor, current.factor))
    same_sample = _near(new.sample_seconds, current.sample_seconds)
    if same_factor and same_sample:
        return current
    if same_factor:  # only the samples move: the lease and heartbeat stay as they are
        return Pace(current.heartbeat_seconds, current.lease_seconds, new.sample_seconds,
                    current.factor)
    return new
