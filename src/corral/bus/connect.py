"""Connecting to the bus and asking it questions, with errors an operator can act on.

nats-py, left to its defaults, retries a refused first connection for two minutes and then says
``NoServersError()``; a wrong token shows up as ``nats: 'Authorization Violation'``. Both sides
(server and agent) connect through :func:`connect`, which makes one quick probe so the first
failure is reported at once in plain words, then opens the real connection that reconnects for
ever (a restarted nats-server must not take the fleet down with it).

:func:`request` is the one way to make a request/reply call: it turns "nobody listens" and
"nobody answered in time" into :class:`~corral.errors.HostUnavailable`, and a
:class:`~corral.bus.messages.Reply` with ``ok=False`` into the error the other side raised.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeVar

import nats
import nats.errors
from nats.aio.client import Client
from pydantic import BaseModel, ValidationError

from corral.bus import codec
from corral.bus.identity import Credentials
from corral.bus.messages import Reply
from corral.errors import CorralError, HostUnavailable, Unauthorized, from_dict

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

CONNECT_TIMEOUT = 5.0


async def _log_error(exc: Exception) -> None:
    log.warning("nats: %s", exc or repr(exc))


def _explain(url: str, exc: BaseException) -> CorralError:
    text = str(exc)
    if "authorization" in text.lower() or isinstance(exc, nats.errors.AuthorizationError):
        return Unauthorized(
            f"the NATS server at {url} refused our credentials",
            hint="a host logs in with its own identity: enroll it ('corral host add NAME', "
                 "then the agent with --join TOKEN); tools use the fleet's token",
        )
    return HostUnavailable(
        f"cannot reach a NATS server at {url}: {text or type(exc).__name__}",
        hint="is 'corral server' running? check the URL (nats://host:port) and the firewall",
    )


def servers(url: str | list[str]) -> list[str]:
    """The node URLs of ``url``: one, or several comma-separated (the nodes of a cluster).
    nats-py takes a list and fails over between them; a comma string it would read as one
    malformed URL."""
    parts = url if isinstance(url, list) else url.split(",")
    return [p.strip() for p in parts if p.strip()]


async def connect(url: str | list[str], token: str | Credentials, name: str,
                  **kw: Any) -> Client:
    """An authenticated connection named ``name`` that reconnects after it was once up.

    ``url`` may name several nodes of a cluster (a list, or comma-separated): the first
    connection takes any that answers, and a lost one moves to another (the nodes a cluster
    announces are added as they are learned). Extra keyword arguments go to ``nats.connect``
    (callbacks, ``reconnect_time_wait`` ...). Raises :class:`Unauthorized` for a refused
    token, :class:`HostUnavailable` when nothing answers at ``url``.
    """
    nodes = servers(url)
    url = ",".join(nodes)
    if not nodes:
        raise HostUnavailable("no NATS server URL given",
                              hint="pass --nats URL (several: comma-separated)")
    timeout = float(kw.pop("connect_timeout", CONNECT_TIMEOUT))
    creds = token if isinstance(token, Credentials) else Credentials(token=token)
    login = creds.options()
    seen: list[Exception] = []

    async def remember(exc: Exception) -> None:
        seen.append(exc)

    try:
        # max_reconnect_attempts=0 would mean "for ever" to nats-py; 1 is one quick retry.
        probe = await asyncio.wait_for(
            nats.connect(nodes, name=f"{name}-probe", allow_reconnect=False,
                         max_reconnect_attempts=1, reconnect_time_wait=0.1,
                         connect_timeout=timeout, error_cb=remember, **login),
            timeout * (len(nodes) + 1),
        )
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        cause = seen[0] if seen else exc
        raise _explain(url, cause) from exc
    await probe.close()
    options: dict[str, Any] = {
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "error_cb": _log_error,
    }
    options.update(login)
    options.update(kw)
    try:
        return await asyncio.wait_for(
            nats.connect(nodes, name=name, connect_timeout=timeout, **options),
            timeout * (len(nodes) + 1),
        )
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        raise _explain(url, exc) from exc


async def request(nc: Client, subject: str, msg: BaseModel, reply_model: type[M],
                  timeout: float) -> M:
    """Send ``msg`` and decode the answer as ``reply_model``; failures become CorralErrors."""
    where = subject.rsplit(".", 1)[-1]
    try:
        resp = await nc.request(subject, codec.encode(msg), timeout=timeout)
    except nats.errors.NoRespondersError as exc:
        raise HostUnavailable(
            f"nothing answers on {subject} (is the agent for '{where}' running?)",
            hint="check 'corral host ls'; start the agent or wait for it to re-join",
        ) from exc
    except (TimeoutError, nats.errors.TimeoutError) as exc:
        raise HostUnavailable(
            f"no reply on {subject} within {timeout:g}s",
            hint="the agent may be overloaded or hung; check its log and try again",
        ) from exc
    except nats.errors.Error as exc:
        raise HostUnavailable(f"bus error on {subject}: {exc}",
                              hint="check the NATS server and try again") from exc
    try:
        out = codec.decode(resp.data, reply_model)
    except ValidationError as exc:
        raise CorralError(
            f"malformed reply on {subject}: {exc.errors()[0].get('msg', exc)}",
            hint="the agent and server versions may differ; upgrade both",
        ) from exc
    if isinstance(out, Reply) and not out.ok:
        raise from_dict(out.error or {"message": f"{subject} failed without saying why"})
    return out
