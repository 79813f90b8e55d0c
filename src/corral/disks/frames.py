"""The data channel's framing and its client's TLS context: all that the remote shell
(:mod:`corral.disks.rsh`) needs of :mod:`corral.disks.channel`. Kept apart because rsync
starts one remote shell per pass, and importing the whole channel (asyncio, the tickets'
``cryptography``) was a third of its 0.12-0.18 s start."""

from __future__ import annotations

import ssl
import struct

#: ``type(1) | length(4) | payload``
FRAME = struct.Struct(">BI")
DATA, EOF, ERR, EXIT = 1, 2, 3, 4
MAX_FRAME = 4 * 1024 * 1024


def frame(kind: int, payload: bytes = b"") -> bytes:
    return FRAME.pack(kind, len(payload)) + payload


def client_context(ca_file: str, cert_file: str = "", key_file: str = "") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)  # checks the receiver's name
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file or None)
    return ctx
