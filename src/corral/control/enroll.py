"""Enrolling hosts: ``corral host add`` makes a one-time join token, the agent trades it for its
bus identity, ``corral host rm`` revokes it.

The token is good once, for one named host, for an hour, and only its hash is kept. Trading it,
the agent sends the public half of the nkey it made (its seed never leaves the host) and, with
TLS on, a certificate request for its data channel; the server lists the key in the bus's
config (reloaded at once: the host may log in from then on), signs the certificate with the
fleet's CA, makes the host an API token of role ``host`` (named ``host-NAME``), and answers
with what the agent needs to trust the fleet: the CA, the key that signs transfer tickets, and
where the bus is. Removing a host takes its key out of the bus's config (its connection is
closed by the reload), revokes its API token and forgets the host.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from corral.bus.identity import HostKey, check_host, check_public_key
from corral.control.db import Host, HostIdentity, Instance, JoinToken, Standby
from corral.control.pki import Authority
from corral.control.tokens import TokenStore
from corral.errors import Conflict, NotFound, Unauthorized

log = logging.getLogger(__name__)

#: a join token is good this long
TOKEN_TTL = 3600.0


def token_name(host: str) -> str:
    """The name of the API token (role ``host``) an enrolment makes for ``host``."""
    return f"host-{host}"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Grant:
    """What ``host add`` prints: the token (shown once) and until when it is good."""

    host: str
    token: str
    expires_at: float


@dataclass(frozen=True)
class Enrolled:
    """What an agent gets for its token."""

    host: str
    nats_url: str
    ca_pem: str
    ticket_key: str
    cert_pem: str
    #: the host's own API token (role ``host``: image fetches and uploads), shown this once
    api_token: str = ""


class Enrollment:
    def __init__(self, sessions: sessionmaker[Session], authority: Authority | None,
                 nats_url: Callable[[], str], on_change: Callable[[], None],
                 ticket_key: str = "", tokens: TokenStore | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.sessions = sessions
        self.authority = authority
        self.ticket_key = ticket_key
        self.tokens = tokens
        self.nats_url = nats_url
        self.on_change = on_change
        self.clock = clock

    def keys(self) -> list[HostKey]:
        with self.sessions() as s:
            return [HostKey(i.host, i.public_key) for i in s.scalars(
                select(HostIdentity).order_by(HostIdentity.host))]

    def add(self, host: str, ttl: float = TOKEN_TTL) -> Grant:
        """A join token for ``host`` (a new one replaces one not yet used)."""
        check_host(host)
        token = secrets.token_urlsafe(24)
        now = self.clock()
        with self.sessions.begin() as s:
            if s.get(HostIdentity, host) is not None:
                raise Conflict(f"host {host} is already enrolled",
                               hint=f"'corral host rm {host}' first to enroll it again")
            s.merge(JoinToken(host=host, token_hash=_hash(token), created_at=now,
                              expires_at=now + ttl))
        log.info("join token made for host %s (good for %.0f s)", host, ttl)
        return Grant(host, token, now + ttl)

    def join(self, host: str, token: str, public_key: str, csr_pem: str, address: str
             ) -> Enrolled:
        """Trade ``token`` for ``host``'s bus identity (once)."""
        check_host(host)
        check_public_key(public_key)
        with self.sessions.begin() as s:
            grant = s.get(JoinToken, host)
            if grant is None or not hmac.compare_digest(grant.token_hash, _hash(token)):
                raise Unauthorized(f"no valid join token for host {host}",
                                   hint=f"make one with 'corral host add {host}'")
            s.delete(grant)  # one use, whatever happens next
            if grant.expires_at < self.clock():
                raise Unauthorized(f"the join token for host {host} has expired",
                                   hint=f"make a new one with 'corral host add {host}'")
            if s.get(HostIdentity, host) is not None:
                raise Conflict(f"host {host} is already enrolled",
                               hint=f"'corral host rm {host}' first to enroll it again")
            taken = s.scalar(select(HostIdentity).where(HostIdentity.public_key == public_key))
            if taken is not None:
                raise Conflict("that key already belongs to another host",
                               hint="each host makes its own key")
            s.add(HostIdentity(host=host, public_key=public_key, enrolled_at=self.clock()))
        cert = b""
        if self.authority is not None and csr_pem:
            cert = self.authority.sign_host(csr_pem, host, address)
        api_token = ""
        if self.tokens is not None:
            self.tokens.revoke(token_name(host))  # one left by an earlier enrolment of the name
            api_token = self.tokens.create(token_name(host), "host")
        self.on_change()
        log.warning("host %s enrolled (key %s...)", host, public_key[:12])
        return Enrolled(
            host=host, nats_url=self.nats_url(),
            ca_pem=self.authority.ca_file.read_text() if self.authority else "",
            ticket_key=self.ticket_key, cert_pem=cert.decode(), api_token=api_token)

    def remove(self, host: str) -> None:
        """Revoke ``host`` and forget it: refused while anything still lives there."""
        with self.sessions.begin() as s:
            known = s.get(HostIdentity, host) or s.get(Host, host) or s.get(JoinToken, host)
            if known is None:
                raise NotFound(f"no host named {host}", hint="see 'corral host ls'")
            h = s.get(Host, host)
            up = h is not None and h.state == "up"
            on = list(s.scalars(select(Instance.name).where(Instance.host == host)))
            kept = list(s.scalars(select(Instance.name).where(
                Instance.disk_host == host, Instance.host.is_(None) | (Instance.host != host))))
            standbys = list(s.scalars(select(Standby.instance).where(Standby.host == host)))
            parts = [f"{what}: {', '.join(sorted(names)[:10])}"
                     + (f" (+{len(names) - 10} more)" if len(names) > 10 else "")
                     for what, names in (("instances", on), ("standbys", standbys),
                                         ("kept disks", kept)) if names]
            if up or parts:
                why = [*(["is up (its agent still runs)"] if up else []),
                       *([f"still holds {'; '.join(parts)}"] if parts else [])]
                steps = [*([f"drain it ('corral host drain {host}')"] if parts else []),
                         *(["stop its agent and wait until 'corral host ls' shows it down"]
                           if up else [])]
                raise Conflict(f"host {host} {' and '.join(why)}",
                               hint=f"{', then '.join(steps)}, then remove it" + (
                                   " (a host that is down: bring its agent back to drain "
                                   "it, or move or remove them: corral migrate, corral "
                                   "standby rm, corral rm)" if parts and not up else ""))
            for row in (s.get(HostIdentity, host), s.get(JoinToken, host), s.get(Host, host)):
                if row is not None:
                    s.delete(row)
        if self.tokens is not None:
            self.tokens.revoke(token_name(host))
        self.on_change()
        log.warning("host %s removed: its key no longer opens the bus", host)
