"""JetStream streams corral keeps: their names, subjects and retention, in one place."""

from __future__ import annotations

from typing import Any

from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from corral.bus import subjects

LOGS = "CORRAL_LOGS"
EVENTS = "CORRAL_EVENTS"


#: batches one instance may keep in the log stream (per host it ran on: subjects are
#: ``corral.logs.<host>.<instance>``) (a batch is at most 256 KiB, so at most
#: 1 GiB of an 8 GiB stream): past it that instance's oldest batches go, not everyone's. One
#: chatty instance used to push every other instance's logs out of the shared stream.
MAX_BATCHES_PER_INSTANCE = 4096


def logs_config(max_age_s: float = 7 * 86400, max_bytes: int = 8 * 1024**3,
                per_instance: int = MAX_BATCHES_PER_INSTANCE) -> StreamConfig:
    return StreamConfig(
        name=LOGS,
        subjects=[subjects.LOGS_ALL],
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        max_age=max_age_s,
        max_bytes=max_bytes,
        max_msgs_per_subject=per_instance,
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
