"""A TCP proxy on 127.0.0.1 between one server and its database, which a test can cut.

``cut("refuse")``: every connection through it is closed, and new ones are closed as soon as
they are accepted. ``cut("blackhole")``: every connection through it is closed, and new ones
are accepted and then never answered (what a dropped route looks like: no error, just
silence). ``heal()``: new connections go through again; the ones held silent are closed.

Threads, not the test's event loop: it must go on proxying while that loop is busy.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Literal

Mode = Literal["open", "refuse", "blackhole"]


class DbProxy:
    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.mode: Mode = "open"
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._held: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._closed = False
        #: connections accepted while cut (refused or held silent)
        self.turned_away = 0
        self._thread = threading.Thread(target=self._accept, name="dbproxy", daemon=True)
        self._thread.start()

    # -- control ---------------------------------------------------------------------------
    def cut(self, mode: Literal["refuse", "blackhole"]) -> None:
        with self._lock:
            self.mode = mode
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            _close(a)
            _close(b)

    def heal(self) -> None:
        with self._lock:
            self.mode = "open"
            held, self._held = self._held, []
        for s in held:
            _close(s)

    def close(self) -> None:
        self._closed = True
        _close(self._listener)
        self.cut("refuse")
        self.heal()
        self._thread.join(5)

    # -- the work ----------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                mode = self.mode
                if mode == "blackhole":
                    self._held.append(client)
                    self.turned_away += 1
            if mode == "refuse":
                self.turned_away += 1
                _close(client)
            elif mode == "blackhole":
                threading.Thread(target=_drain, args=(client,), daemon=True).start()
            else:
                threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        try:
            up = socket.create_connection(self.upstream, timeout=5)
            up.settimeout(None)
        except OSError:
            _close(client)
            return
        with self._lock:
            if self.mode != "open":  # cut while connecting
                _close(client)
                _close(up)
                return
            self._pairs.append((client, up))
        for src, dst in ((client, up), (up, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        _close(src)
        _close(dst)
        with self._lock:
            self._pairs = [p for p in self._pairs if src not in p]


def _drain(sock: socket.socket) -> None:
    """Read and drop whatever comes, answer nothing, until the socket is closed."""
    with contextlib.suppress(OSError):
        while sock.recv(65536):
            pass


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
