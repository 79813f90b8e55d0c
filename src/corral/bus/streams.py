"""JetStream streams corral keeps: their names, subjects, retention and copies, in one place.

In a NATS cluster a stream is kept on ``replicas`` nodes (three in a cluster of three: one node
may die without losing an acknowledged message; JetStream acknowledges a write once a majority
of them have it). A cluster's JetStream answers only once a majority of its nodes are up, and a
replicated stream is made only once as many nodes as it has copies are, so :func:`ensure` waits
for that (bounded) instead of failing a server that started before its peers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from corral.bus import subjects

log = logging.getLogger(__name__)

LOGS = "CORRAL_LOGS"
EVENTS = "CORRAL_EVENTS"


#: batches one instance may keep in the log stream (per host it ran on: subjects are
#: ``corral.logs.<host>.<instance>``) (a batch is at most 256 KiB, so at most
#: 1 GiB of an 8 GiB stream): past it that instance's oldest batches go, not everyone's. One
#: chatty instance used to push every other instance's logs out of the shared stream.
MAX_BATCHES_PER_INSTANCE = 4096


#: how long :func:`ensure` waits for a cluster's JetStream to be able to make a stream
READY_WAIT = 60.0
#: JetStream errors that mean "not enough nodes yet": no meta leader, too few peers
_NOT_YET = {10008, 10005, 10023}


def logs_config(max_age_s: float = 7 * 86400, max_bytes: int = 8 * 1024**3,
                per_instance: int = MAX_BATCHES_PER_INSTANCE, replicas: int = 1
                ) -> StreamConfig:
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
        num_replicas=replicas,
    )


def events_config(max_age_s: float = 30 * 86400, max_msgs: int = 1_000_000,
                  replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=EVENTS,
        subjects=[subjects.EVENTS],
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        max_age=max_age_s,
        max_msgs=max_msgs,
        num_replicas=replicas,
    )


async def ensure(js: Any, config: StreamConfig, replicas: int | None = None,
                 wait: float = READY_WAIT) -> None:
    """Create the stream, or bring an existing one to this config.

    ``replicas`` sets the number of copies (an existing stream is scaled to it); None keeps
    an existing stream's copies whatever ``config`` says, so a caller that does not know the
    cluster's setting (a log sink, a test) never scales a stream down. While the cluster's
    JetStream cannot answer or place the copies yet, tried again for up to ``wait`` seconds.
    """
    from nats.js.errors import NotFoundError

    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    said = False
    while True:
        try:
            try:
                info = await js.stream_info(config.name)
            except NotFoundError:
                copies = replicas if replicas is not None else config.num_replicas
                await js.add_stream(dataclasses.replace(config, num_replicas=copies))
            else:
                copies = replicas if replicas is not None else (
                    info.config.num_replicas or config.num_replicas)
                await js.update_stream(dataclasses.replace(config, num_replicas=copies))
            return
        except Exception as exc:
            if not _not_yet(exc) or loop.time() > deadline:
                raise
            if not said:
                log.warning("JetStream cannot make stream %s yet (%s): waiting for the other "
                            "nodes of the cluster", config.name, exc or type(exc).__name__)
                said = True
            await asyncio.sleep(0.5)


def _not_yet(exc: BaseException) -> bool:
    """Whether ``exc`` means the cluster is not ready (too few nodes up) rather than wrong."""
    import nats.errors
    from nats.js.errors import APIError, ServerError, ServiceUnavailableError

    if isinstance(exc, TimeoutError | nats.errors.TimeoutError | nats.errors.NoRespondersError
                  | ServiceUnavailableError | ServerError):
        return True
    return isinstance(exc, APIError) and exc.err_code in _NOT_YET
