"""API tokens with roles: who may call which routes of the server.

The fleet token (``DATA/token``) stays the admin's key and is never stored here. Every other
token is named and has one role (see :data:`corral.api.models.ROLES`): ``admin``,
``read-only`` (GET routes only) or ``host`` (the image-store routes an agent uses to fetch
chunks and upload shelved disks; the enrolment of a host makes one for it).

A token reads ``corral_<key id>_<secret>``. Only the SHA-256 of the whole token is kept: a
stolen copy of the database (or a backup) lets nobody in, and a random 256-bit secret needs no
slow hash. The key id is the token's public part: a lookup by it finds at most one row, and
the hashes are then compared in constant time, so the time an answer takes tells nothing about
how much of a guessed secret was right. The plaintext exists once, in :meth:`TokenStore.create`'s
answer.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from corral.api.models import ROLES, TokenRole, TokenView
from corral.api.names import check
from corral.control.db import ApiToken
from corral.errors import Conflict, InvalidRequest

Role = TokenRole
PREFIX = "corral_"
#: the principal the fleet token stands for; no stored token may take its name
FLEET = "fleet"
_NO_HASH = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a token's name and its role."""

    name: str
    role: Role


def _digest(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


class TokenStore:
    """Named tokens in the server's database (table ``api_tokens``, migration 0007)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def create(self, name: str, role: Role) -> str:
        """A new token named ``name`` with ``role``; returns it, the one time it is seen.
        A name already taken is a Conflict (revoke it first to replace it)."""
        try:
            check("token", name)
        except ValueError as exc:
            raise InvalidRequest(str(exc), hint="name it like a host or a user, e.g. "
                                                "ci-deploy") from None
        if name == FLEET:
            raise InvalidRequest(f"'{FLEET}' names the fleet token (DATA/token)",
                                 hint="pick another name")
        if role not in ROLES:
            raise InvalidRequest(f"unknown role {role!r}", hint=f"one of: {', '.join(ROLES)}")
        key_id = secrets.token_hex(8)
        plaintext = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        with self.sessions.begin() as s:
            if s.get(ApiToken, name) is not None:
                raise Conflict(f"a token named '{name}' exists",
                               hint=f"revoke it first ('corral token rm {name}') or pick "
                                    "another name")
            s.add(ApiToken(name=name, key_id=key_id, secret_sha256=_digest(plaintext),
                           role=role, created_at=time.time()))
        return plaintext

    def resolve(self, plaintext: str) -> Principal | None:
        """The principal a presented token stands for, or None (unknown, revoked, malformed)."""
        key_id, sep, rest = plaintext.removeprefix(PREFIX).partition("_")
        if not plaintext.startswith(PREFIX) or not sep or not rest or len(key_id) != 16:
            return None
        with self.sessions() as s:
            row = s.scalar(select(ApiToken).where(ApiToken.key_id == key_id))
            stored = row.secret_sha256 if row is not None else _NO_HASH
            # compared even without a row, so an unknown key id costs what a known one does
            same = hmac.compare_digest(_digest(plaintext), stored)
            if row is None or not same or row.role not in ROLES:
                return None
            return Principal(row.name, row.role)

    def revoke(self, name: str) -> bool:
        """Forget the token ``name``; False when there was none. It stops working at once:
        every request looks its token up again."""
        with self.sessions.begin() as s:
            row = s.get(ApiToken, name)
            if row is None:
                return False
            s.delete(row)
            return True

    def list(self) -> builtins.list[TokenView]:
        """Every stored token by name, without secrets."""
        with self.sessions() as s:
            rows = s.scalars(select(ApiToken).order_by(ApiToken.name))
            return [TokenView(name=r.name, role=r.role,  # type: ignore[arg-type]
                              created_at=r.created_at) for r in rows]
