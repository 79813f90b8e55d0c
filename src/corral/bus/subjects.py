"""Every NATS subject corral uses, in one place, so nothing else spells them out."""

from __future__ import annotations

PREFIX = "corral"

JOIN_ALL = f"{PREFIX}.join.*"  # agent -> server, request/reply: register a host
EVENTS = f"{PREFIX}.events"  # server -> anyone: committed state changes (JetStream later)
INVALIDATE = f"{PREFIX}.invalidate"


def join(host: str) -> str:
    """agent -> server, request/reply: register ``host`` (only its own identity may publish
    here, so the subject says who joins)."""
    return f"{PREFIX}.join.{host}"


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


def logs(host: str, instance: str) -> str:
    """agent -> JetStream: an instance's log batches, under the host that captured them (a
    host may publish only under its own name)."""
    return f"{PREFIX}.logs.{host}.{instance}"


#: every host's log batches (the stream, sinks, the live traffic index)
LOGS_ALL = f"{PREFIX}.logs.>"


def instance_logs(instance: str) -> str:
    """One instance's batches, from whichever host captured them (a migration moves it)."""
    return f"{PREFIX}.logs.*.{instance}"


def logs_origin(subject: str) -> tuple[str, str]:
    """(host, instance) a log batch came from, read from its subject: the identity the bus
    checked, not a field the sender wrote."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[0] != PREFIX or parts[1] != "logs":
        raise ValueError(f"not a log subject: {subject}")
    return parts[2], parts[3]


def host_from_subject(subject: str) -> str:
    """The last token of a per-host subject."""
    return subject.rsplit(".", 1)[-1]
