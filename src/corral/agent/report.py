"""From what a driver sees to the lifecycle state the server records.

A driver only knows whether the workload runs and, when it ended, how. Whether that end was
*asked for* (stop, kill: ``stopped``), clean (exit code 0: ``exited``) or not (a crash, a kill
behind corral's back, an unknown code after an agent restart: ``failed``) is the agent's
knowledge, so the translation lives here, in one small pure function.
"""

from __future__ import annotations

from corral.agent.store import InstanceRecord
from corral.bus.messages import InstanceReport
from corral.drivers.base import Status
from corral.lifecycle import ALIVE, State


def observed_state(status: Status, stop_requested: bool) -> State:
    """The lifecycle state for a driver ``status``.

    A driver that says ``stopped`` knows the end was asked for (drivers keep that fact in the
    workdir too); ``exited`` is judged by the agent's own flag and the exit code.
    """
    if status.state == "stopped":
        return State.STOPPED
    if status.state == "exited":
        if stop_requested:
            return State.STOPPED
        if status.exit_code == 0 and status.signal is None:
            return State.EXITED
        return State.FAILED
    try:
        return State(status.state)
    except ValueError:
        return State.FAILED


def apply_status(record: InstanceRecord, status: Status) -> bool:
    """Update ``record`` from ``status``; True when the observed state changed."""
    new = observed_state(status, record.stop_requested).value
    if new == State.STOPPED and not record.stop_requested and record.extra.get(
            "ended_unhealthy"):
        # the agent ended it for failing its health check (agent/health.py): the driver
        # remembers a requested end, but nobody asked; it failed, for its restart policy
        new = State.FAILED.value
    changed = new != record.state
    record.state = new
    record.pid = status.pid if new in ALIVE else None
    if new not in ALIVE and new != State.CREATED:
        # Keep an exit code learnt earlier when a later look (after a restart) cannot see it.
        if status.exit_code is not None or status.signal is not None or changed:
            record.exit_code = status.exit_code
            record.signal = status.signal
    else:
        record.exit_code = None
        record.signal = None
    return changed


def is_alive(record: InstanceRecord) -> bool:
    return record.state in ALIVE


def health_of(record: InstanceRecord) -> str | None:
    """None without a check; unknown when not running (see agent/health.py)."""
    if record.spec.check is None:
        return None
    if record.state not in ALIVE:
        return "unknown"
    return str(record.extra.get("health", "unknown"))


def to_report(record: InstanceRecord) -> InstanceReport:
    return InstanceReport(
        name=record.name,
        driver=record.driver,
        state=record.state,
        pid=record.pid,
        exit_code=record.exit_code,
        signal=record.signal,
        epoch=record.epoch,
        restarts=int(record.extra.get("restarts", 0)),
        health=health_of(record),
        health_reason=health_reason_of(record),
        gave_up=not is_alive(record) and bool(record.extra.get("restart_gave_up")),
    )


def health_reason_of(record: InstanceRecord) -> str:
    """Why its check failed: while it runs unhealthy, or after the agent ended it for that
    (the server decides on a failover from it once the restart policy gave up)."""
    if record.spec.check is None:
        return ""
    if is_alive(record):
        if record.extra.get("health") == "unhealthy":
            return str(record.extra.get("health_reason", ""))
        return ""
    if record.extra.get("ended_unhealthy"):
        return str(record.extra.get("unhealthy_reason", "") or "unhealthy")
    return ""
