"""Every NATS subject corral uses, in one place, so nothing else spells them out."""

from __future__ import annotations

PREFIX = "corral"

JOIN = f"{PREFIX}.join"  # agent -> server, request/reply: register a host
EVENTS = f"{PREFIX}.events"  # server -> anyone: committed state changes (JetStream later)
INVALIDATE = f"{PREFIX}.invalidate"


def heartbeat(host: str) -> str:
    """agent -> server, request/reply: renews the host's lease, carries observed instance states."""
    return f"{PREFIX}.hb.{host}"


def command(host: str) -> str:
    """server -> agent, request/reply: one verb from :data:`corral.bus.rpc.CALLS`."""
    return f"{PREFIX}.cmd.{host}"


def metrics(host: str) -> str:
    """agent -> anyone: one sample of every instance's counters and CPU figures."""
    return f"{PREFIX}.metrics.{host}"


HEARTBEAT_ALL = f"{PREFIX}.hb.*"
METRICS_ALL = f"{PREFIX}.metrics.*"


def logs(instance: str) -> str:
    return f"{PREFIX}.logs.{instance}"


def host_from_subject(subject: str) -> str:
    """The last token of a per-host subject."""
    return subject.rsplit(".", 1)[-1]
