"""The dashboard's sessions: a token traded once for a signed cookie, and a CSRF token per session.

Why a signed value and not a table: sessions need no migration and no write per login, and a
server restart keeps them (the key is derived from the fleet token: :func:`derive_key`). Why
the cookie still cannot outlive the token it came from: it names the token (the fleet token by
an HMAC of it, a named token by its key id), and every request checks that this token still
exists with that role, so revoking a token (or changing DATA/token) ends its sessions at the
next request, as for a bearer token.

The CSRF token is an HMAC of the session's random id: no storage, different for every session,
and unknown to another site (SameSite=Strict keeps the cookie off cross-site requests in the
browsers that honour it; the CSRF header covers the rest). Every dashboard POST must carry it
in ``X-CSRF-Token``; the guard checks it before the route runs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.datastructures import Headers

from corral.control.tokens import FLEET, PREFIX, Principal

COOKIE = "corral_session"
#: how long a session lasts after login (a new login gives a new one)
LIFETIME = 12 * 3600
#: the most characters of cookie looked at (a browser sends at most ~4 KiB per cookie)
MAX_COOKIE = 1024


@dataclass(frozen=True)
class Session:
    """One signed-in browser: who, until when, and its CSRF token."""

    principal: Principal
    #: "fleet" for the fleet token, else the named token's key id
    kid: str
    sid: str
    expires: float
    csrf: str


def derive_key(fleet_token: str) -> bytes:
    """The signing key, derived from the fleet token: every server of a fleet has that token
    (``DATA/token``, 0600), so a cookie made by one is good on all of them (a follower forwards
    a dashboard write to the leader, cookie and all), no key file has to be copied between
    them, and a new fleet token ends every session."""
    return hmac.new(fleet_token.encode(), b"corral dashboard sessions v1", hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sessions:
    """Signs and checks session cookies. ``fleet_token`` is the admin's token; ``named(name)``
    is (key id, role) of a stored token, or None once it is revoked."""

    def __init__(self, key: bytes, fleet_token: str,
                 resolve: Callable[[str], Principal | None],
                 named: Callable[[str], tuple[str, str] | None],
                 clock: Callable[[], float] = time.time) -> None:
        self.key = key
        self.fleet_token = fleet_token
        self.resolve = resolve
        self.named = named
        self.clock = clock

    def _mac(self, purpose: str, data: str) -> str:
        return _b64(hmac.new(self.key, f"{purpose}:{data}".encode(), hashlib.sha256).digest())

    def _fleet_kid(self) -> str:
        return "fleet:" + self._mac("fleet", self.fleet_token)[:22]

    def login(self, token: str) -> tuple[Session, str] | None:
        """(the session, its cookie value) for a presented token, or None when it opens
        nothing (a host token opens no dashboard)."""
        token = token.strip()
        if hmac.compare_digest(token.encode(), self.fleet_token.encode()):
            principal, kid = Principal(FLEET, "admin"), self._fleet_kid()
        elif token.startswith(PREFIX):
            found = self.resolve(token)
            if found is None or found.role not in ("admin", "read-only"):
                return None
            principal, kid = found, token.removeprefix(PREFIX).partition("_")[0]
        else:
            return None
        sid = secrets.token_urlsafe(18)
        expires = float(int(self.clock()) + LIFETIME)
        payload = _b64(json.dumps({"n": principal.name, "r": principal.role, "k": kid,
                                   "s": sid, "e": expires}, separators=(",", ":")).encode())
        value = f"{payload}.{self._mac('session', payload)}"
        return Session(principal, kid, sid, expires, self._mac("csrf", sid)), value

    def check(self, value: str | None) -> Session | None:
        """The session a cookie value stands for, or None: unsigned, expired, or its token
        revoked since (or its role changed)."""
        if not value or len(value) > MAX_COOKIE or "." not in value:
            return None
        payload, _, mac = value.partition(".")
        if not hmac.compare_digest(mac.encode(), self._mac("session", payload).encode()):
            return None
        try:
            data = json.loads(_unb64(payload))
            name, role, kid = str(data["n"]), str(data["r"]), str(data["k"])
            sid, expires = str(data["s"]), float(data["e"])
        except (ValueError, KeyError, TypeError):
            return None
        if expires <= self.clock() or role not in ("admin", "read-only"):
            return None
        if name == FLEET:
            if not hmac.compare_digest(kid.encode(), self._fleet_kid().encode()):
                return None
        elif self.named(name) != (kid, role):
            return None
        return Session(Principal(name, role), kid, sid, expires,  # type: ignore[arg-type]
                       self._mac("csrf", sid))

    def from_headers(self, headers: Headers) -> Session | None:
        return self.check(cookie_value(headers.get("cookie", ""), COOKIE))

    def csrf_ok(self, session: Session, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(),
                                                             session.csrf.encode())


def cookie_value(header: str, name: str) -> str | None:
    """The value of cookie ``name`` in a Cookie header (the first one), or None."""
    for part in header[:8192].split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k == name:
            return v.strip().strip('"')
    return None


def set_cookie_header(value: str, *, secure: bool, max_age: int = LIFETIME) -> str:
    """The Set-Cookie header: HttpOnly (no script reads it), SameSite=Strict, Secure over
    https, for the whole site."""
    parts = [f"{COOKIE}={value}", "Path=/", "HttpOnly", "SameSite=Strict",
             f"Max-Age={max_age}"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)
