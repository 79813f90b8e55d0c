"""Remote shell for rsync/btrfs transfers over the agents' data channel.

rsync runs it as ``python -m corral.disks.rsh --port P --token-file F HOST CMD ARGS...``
(``rsync -e``); it connects to HOST:P, authenticates the command (see
:mod:`corral.disks.channel`), then relays stdin/stdout until both ends close. The token comes from
a file, never from the command line, so it does not show in ``ps``.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import struct
import sys

from corral.disks.channel import DATA, EOF, ERR, EXIT, FRAME, frame, mac


def relay(sock: socket.socket, fd_in: int, fd_out: int) -> int:
    """Frame stdin into DATA, unframe DATA to stdout; returns the remote command's status."""
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "sock")
    sel.register(fd_in, selectors.EVENT_READ, "in")
    buf = bytearray()
    while True:
        for key, _ in sel.select():
            if key.data == "in":
                data = os.read(fd_in, 256 * 1024)
                if not data:
                    sel.unregister(fd_in)
                    sock.sendall(frame(EOF))
                else:
                    sock.sendall(frame(DATA, data))
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="corral-rsh")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--token-file", required=True)
    ap.add_argument("--timeout", type=float, default=15.0)
    ap.add_argument("-l", dest="user", default=None)  # rsync may pass a user; ignored
    ap.add_argument("host")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    with open(args.token_file) as fh:
        token = fh.read().strip()
    sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
    # rsync's protocol has small request/answer exchanges: Nagle + delayed ACK would add ~40 ms
    # to each, and the frozen pass is made of them
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    hello = json.loads(_line(sock))
    command = [str(c) for c in args.command]
    sock.sendall(json.dumps({"argv": command, "mac": mac(token, hello["nonce"], command)})
                 .encode() + b"\n")
    answer = json.loads(_line(sock))
    if not answer.get("ok"):
        print(f"corral data channel: {answer.get('error')}", file=sys.stderr)
        return 12
    ready = os.environ.get("CORRAL_RSH_READY")
    if ready:  # a prepared pass waits for this before it freezes the instance
        open(ready, "w").close()
    sock.settimeout(None)
    return relay(sock, 0, 1)


if __name__ == "__main__":
    sys.exit(main())
