"""Transfer tickets: the server's written permission for one disk transfer between two hosts.

A host's data channel accepts a transfer only with a ticket the server signed (Ed25519; the
agents know the server's public key from enrollment) that names the instance, the slot it goes
into, the sending and the receiving host, and an expiry a few minutes ahead. Together with mutual
TLS (each side's certificate names its host), a host can send or receive only the disks an
operation told it to, and a captured ticket is useless to anyone but the host it names.
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from corral.errors import Unauthorized

#: a ticket outlives its transfer's start by this much at most
TTL = 300.0


@dataclass(frozen=True)
class Ticket:
    instance: str
    slot: str
    source: str
    target: str
    expires: float

    def encode(self, key: Ed25519PrivateKey) -> str:
        body = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        sig = key.sign(body)
        return f"{_b64(body)}.{_b64(sig)}"


def signing_key(path: Path) -> Ed25519PrivateKey:
    """The server's ticket key at ``path``, made (0600) on first use."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    except FileNotFoundError:
        key = Ed25519PrivateKey.generate()
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 key")
    return key


def public_hex(key: Ed25519PrivateKey) -> str:
    """The public half, as agents get it (raw bytes, hex)."""
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw).hex()


def public_from_hex(text: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))


def issue(key: Ed25519PrivateKey, instance: str, slot: str, source: str, target: str,
          ttl: float = TTL) -> str:
    return Ticket(instance, slot, source, target, time.time() + ttl).encode(key)


def verify(text: str, public: Ed25519PublicKey, now: float | None = None) -> Ticket:
    """The ticket, if the server signed it and it has not expired; else Unauthorized."""
    try:
        body_b64, sig_b64 = text.split(".", 1)
        body, sig = _unb64(body_b64), _unb64(sig_b64)
        public.verify(sig, body)
        raw = json.loads(body)
        ticket = Ticket(str(raw["instance"]), str(raw["slot"]), str(raw["source"]),
                        str(raw["target"]), float(raw["expires"]))
    except (ValueError, KeyError, TypeError, InvalidSignature) as exc:
        raise Unauthorized("the transfer ticket is not one the server signed",
                           hint="transfers are started by the server's operations only") from exc
    if ticket.expires < (time.time() if now is None else now):
        raise Unauthorized("the transfer ticket has expired",
                           hint="the operation took too long to start its pass; run it again")
    return ticket


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
