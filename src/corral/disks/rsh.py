"""Remote shell for rsync/btrfs transfers over the agents' data channel.

rsync runs it as ``python -m corral.disks.rsh --port P [--cert F --key F --ca F --peer NAME]
ADDRESS CMD ARGS...`` (``rsync -e``); it connects to ADDRESS:P (over TLS when given the CA,
checking that the receiver's certificate names NAME), hands over the command and its transfer
ticket (see :mod:`corral.disks.channel`), then relays stdin/stdout until both ends close. The
ticket comes in ``CORRAL_TICKET``, never on the command line, so it does not show in ``ps``.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import ssl
import struct
import sys

from corral.disks.frames import DATA, EOF, ERR, EXIT, FRAME, client_context, frame

TICKET_ENV = "CORRAL_TICKET"
READY_ENV = "CORRAL_RSH_READY"


def _pending(sock: socket.socket) -> bool:
    """Bytes TLS already decrypted: they are in the SSL object, not the socket, so ``select``
    does not report them (a last frame would wait there for data that never comes)."""
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0


def relay(sock: socket.socket, fd_in: int, fd_out: int) -> int:
    """Frame stdin into DATA, unframe DATA to stdout; returns the remote command's status."""
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "sock")
    sel.register(fd_in, selectors.EVENT_READ, "in")
    buf = bytearray()
    while True:
        pending = _pending(sock)
        ready = {key.data for key, _ in sel.select(0 if pending else None)}
        if pending:
            ready.add("sock")
        if "in" in ready:
            data = os.read(fd_in, 256 * 1024)
            if not data:
                sel.unregister(fd_in)
                sock.sendall(frame(EOF))
            else:
                sock.sendall(frame(DATA, data))
        if "sock" not in ready:
            continue
        data = sock.recv(256 * 1024)
        if not data:
            print("corral data channel: connection closed before the remote exit status",
                  file=sys.stderr)
            return 255
        buf += data
        while len(buf) >= FRAME.size:
            kind, length = FRAME.unpack_from(buf)
            if len(buf) < FRAME.size + length:
                break
            payload = bytes(buf[FRAME.size:FRAME.size + length])
            del buf[:FRAME.size + length]
            if kind == DATA:
                view = memoryview(payload)
                while view:
                    n = os.write(fd_out, view)
                    view = view[n:]
            elif kind == ERR and payload:
                sys.stderr.write(payload.decode(errors="replace") + "\n")
            elif kind == EXIT:
                return int(struct.unpack(">i", payload)[0])


def _line(sock: socket.socket, limit: int = 65536) -> bytes:
    """One handshake line, read byte by byte so no data after it is swallowed by a buffer."""
    out = bytearray()
    while len(out) < limit:
        b = sock.recv(1)
        if not b:
            raise ConnectionError("data channel closed during the handshake")
        if b == b"\n":
            return bytes(out)
        out += b
    raise ConnectionError("handshake line too long")


def _connect(args: argparse.Namespace) -> socket.socket:
    sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
    # rsync's protocol has small request/answer exchanges: Nagle + delayed ACK would add ~40 ms
    # to each, and the frozen pass is made of them
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if not args.ca:
        return sock
    ctx = client_context(args.ca, args.cert or "", args.key or "")
    return ctx.wrap_socket(sock, server_hostname=args.peer)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="corral-rsh")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=15.0)
    ap.add_argument("--cert", help="this host's certificate (TLS)")
    ap.add_argument("--key", help="its private key")
    ap.add_argument("--ca", help="the fleet's CA: speak TLS and check the receiver's name")
    ap.add_argument("--peer", help="the receiving host's name, as its certificate says")
    ap.add_argument("-l", dest="user", default=None)  # rsync may pass a user; ignored
    ap.add_argument("host")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.ca and not args.peer:
        ap.error("--ca needs --peer: the receiving host's name is what its certificate proves")
    command = [str(c) for c in args.command]
    hello = {"argv": command, "ticket": os.environ.get(TICKET_ENV, "")}
    try:
        sock = _connect(args)
        sock.sendall(json.dumps(hello).encode() + b"\n")
        answer = json.loads(_line(sock))
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        why = ("; the receiver did not accept this host's certificate, or speaks no TLS"
               if args.ca and isinstance(exc, ConnectionError) else "")
        print(f"corral data channel to {args.peer or args.host}:{args.port}: {exc}{why}",
              file=sys.stderr)
        return 255
    if not answer.get("ok"):
        print(f"corral data channel: {answer.get('error')}", file=sys.stderr)
        return 12
    ready = os.environ.get(READY_ENV)
    if ready:  # a prepared pass waits for this before it freezes the instance
        open(ready, "w").close()
    sock.settimeout(None)
    return relay(sock, 0, 1)


if __name__ == "__main__":
    sys.exit(main())
