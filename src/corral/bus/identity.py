"""Who is who on the bus: one NATS identity per host, and what each identity may do.

Every host has its own NATS nkey (an Ed25519 key pair): the agent makes it and keeps the seed
(0600, in its data dir); the server learns only the public key, at enrollment, and lists it in
the bus's config with that host's permissions. nkeys are NATS's own mechanism for this: no
secret of a host lives on the server, a host is revoked by removing one line and reloading, and
nats-py signs the server's nonce with the seed, so nothing replayable crosses the wire.

A host's identity comes from its connection, never from a message: a host may publish only on
its own subjects (``corral.join.<host>``, ``corral.hb.<host>``, ``corral.metrics.<host>``,
``corral.logs.<host>.>``) and answer what it was asked, subscribe only to its own commands
(``corral.cmd.<host>``), the invalidation broadcast and its own reply inbox
(``_INBOX.<host>.>``), and it has no JetStream API at all (it cannot purge or delete a stream).
So the server reads the host from the subject a message came on. The server's own identity may
do everything; readers (``corral logsink``) may read the log and event streams and nothing else;
a tool holding the fleet's admin token may log in as :data:`ADMIN` and do everything (as it can
through the API).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nkeys

from corral.bus import subjects
from corral.errors import ConfigError, InvalidRequest

#: what a host name must look like to be a subject token and a file name
HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
#: the user name readers (log sinks) log in with, the fleet token as password
READER = "corral-reader"
#: the user name tools log in with, the fleet token as password: everything, like the API's
#: admin (no agent holds that token; hosts have keys of their own)
ADMIN = "corral-admin"


def check_host(name: str) -> str:
    if not HOST_RE.match(name):
        raise InvalidRequest(f"host name {name!r} cannot be a bus identity",
                             hint="use letters, digits, '_' or '-', at most 63 characters")
    return name


def new_seed() -> str:
    """A fresh user nkey seed (``SU...``)."""
    return str(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode())


def public_key(seed: str) -> str:
    """The public key (``U...``) of a user seed."""
    try:
        return str(nkeys.from_seed(seed.encode()).public_key.decode())
    except Exception as exc:
        raise ConfigError(f"not a usable nkey seed: {exc}",
                          hint="remove the identity file to enroll again") from exc


def check_public_key(key: str) -> str:
    """A user public key as the bus accepts it, else InvalidRequest."""
    if not re.fullmatch(r"U[A-Z2-7]{55}", key):
        raise InvalidRequest("not a NATS user public key (U + 55 base32 characters)")
    return key


def inbox(host: str) -> str:
    """The reply-inbox prefix of ``host``: its replies can be read by nobody else."""
    return f"_INBOX.{host}"


def host_permissions(host: str) -> dict[str, object]:
    return {
        "publish": {"allow": [subjects.join(host), subjects.heartbeat(host),
                              subjects.metrics(host), f"{subjects.PREFIX}.logs.{host}.>"]},
        "subscribe": {"allow": [subjects.command(host), subjects.INVALIDATE,
                                f"{inbox(host)}.>"]},
        "allow_responses": {"max": 1, "expires": "10m"},
    }


def reader_permissions() -> dict[str, object]:
    """A log or event reader: consumers on the two streams (and removing a sink's, which a
    sink does to start again at its checkpoint), nothing that changes the streams."""
    js = "$JS.API"
    streams = ("CORRAL_LOGS", "CORRAL_EVENTS")
    return {
        "publish": {"allow": [f"{js}.INFO", *(f"{js}.STREAM.INFO.{s}" for s in streams),
                              *(f"{js}.CONSUMER.*.{s}.>" for s in streams),
                              *(f"{js}.CONSUMER.*.{s}" for s in streams),
                              *(f"{js}.CONSUMER.DURABLE.CREATE.{s}.>" for s in streams),
                              *(f"{js}.CONSUMER.MSG.NEXT.{s}.>" for s in streams),
                              *(f"{js}.STREAM.MSG.GET.{s}" for s in streams),
                              # a sink recreates its own consumer at its checkpoint
                              *(f"{js}.CONSUMER.DELETE.{s}.sink-*" for s in streams),
                              "$JS.ACK.>", "$JS.FC.>"],
                    "deny": [f"{js}.STREAM.PURGE.>", f"{js}.STREAM.DELETE.>",
                             f"{js}.STREAM.UPDATE.>", f"{js}.STREAM.MSG.DELETE.>"]},
        "subscribe": {"allow": ["_INBOX.>", f"{subjects.PREFIX}.logs.>",
                                subjects.EVENTS]},
    }


@dataclass(frozen=True)
class HostKey:
    host: str
    public_key: str


def authorization(server_key: str, hosts: list[HostKey], reader_password: str) -> str:
    """The ``authorization`` block of the bus's config: the server, one user per host, the
    readers and the admin (the fleet token is both's password). JSON is valid NATS config
    syntax, so values need no escaping of our own."""
    users: list[dict[str, object]] = [{"nkey": server_key}]
    users += [{"nkey": h.public_key, "permissions": host_permissions(h.host)} for h in hosts]
    users.append({"user": READER, "password": reader_password,
                  "permissions": reader_permissions()})
    users.append({"user": ADMIN, "password": reader_password})
    return "authorization " + json.dumps({"users": users}, indent=1)


def admin(token: str, ca_file: str = "") -> Credentials:
    """A tool's login with the fleet's admin token."""
    return Credentials(token=token, user=ADMIN, ca_file=ca_file)


@dataclass(frozen=True)
class Credentials:
    """How a process logs in to the bus: an nkey seed (hosts, the server) or a token (tests
    and tools against a bus of their own), the CA to check the bus's certificate with (TLS),
    and the inbox prefix its replies come back on."""

    seed: str = ""
    token: str = ""
    user: str = ""
    ca_file: str = ""
    inbox_prefix: str = "_INBOX"

    def options(self) -> dict[str, object]:
        """Keyword arguments for ``nats.connect``."""
        out: dict[str, object] = {"inbox_prefix": self.inbox_prefix}
        if self.seed:
            out["nkeys_seed_str"] = self.seed
        elif self.user:
            out["user"], out["password"] = self.user, self.token
        elif self.token:
            out["token"] = self.token
        if self.ca_file:
            import ssl

            out["tls"] = ssl.create_default_context(cafile=self.ca_file)
        return out


def read_seed(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""
