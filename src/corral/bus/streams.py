"""JetStream streams corral keeps: their names, subjects and retention, in one place."""

from __future__ import annotations

from typing import Any

from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from corral.bus import subjects

LOGS = "CORRAL_LOGS"
EVENTS = "CORRAL_EVENTS"


def logs_config(max_age_s: float = 7 * 86400, max_bytes: int = 8 * 1024**3) -> StreamConfig:
    return StreamConfig(
        name=LOGS,
        subjects=[subjects.logs("*")],
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        max_age=max_age_s,
        max_bytes=max_bytes,
        duplicate_window=120.0,
    )


def events_config(max_age_s: float = 30 * 86400, max_msgs: int = 1_000_000) -> StreamConfig:
    return StreamConfig(
        name=EVENTS,
        subjects=[subjects.EVENTS],
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        max_age=max_age_s,
        max_msgs=max_msgs,
    )


async def ensure(js: Any, config: StreamConfig) -> None:
    """Create the stream, or bring an existing one to this config."""
    from nats.js.errors import NotFoundError

    try:
        await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
    else:
        await js.update_stream(config)
