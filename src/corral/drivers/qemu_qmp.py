"""A small synchronous QMP client (QEMU Machine Protocol: JSON lines over a unix socket).

The qemu driver is synchronous and makes one short connection per verb, so it needs only the
handshake, ``execute`` and a way past asynchronous events. QEMU's own library (``qemu.qmp``) is
asyncio-first with a "legacy" synchronous wrapper, and would be a new dependency of the whole
package for about a hundred lines of protocol; this is those lines.

A QMP server answers one client at a time (others wait in the listen backlog), so every call has
a timeout, and the driver holds a lock per VM around each connection.

The socket lives in the instance's directory, whose path may be longer than a unix socket path
may be (108 bytes): it is reached through ``/proc/self/fd/<dirfd>/<name>`` of the directory,
opened ``O_PATH``, which is always short.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from corral.errors import DriverError

#: the largest reply corral reads (query-status and friends are a few hundred bytes)
_MAX_LINE = 1 << 20


class QMPError(DriverError):
    """QEMU answered with an error (``class`` and ``desc`` from the reply in ``details``)."""


class QMPUnreachable(DriverError):
    """No QMP conversation could be had: no socket, refused, timed out or closed early."""


class QMP:
    def __init__(self, sock_path: Path, timeout: float = 5.0) -> None:
        self.path = Path(sock_path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 0
        #: asynchronous events read while waiting for replies (SHUTDOWN, STOP, RESUME...)
        self.events: list[dict[str, Any]] = []

    # -- connection ------------------------------------------------------------------------
    def connect(self) -> QMP:
        deadline = time.monotonic() + self.timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            dirfd = os.open(self.path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            sock.close()
            raise QMPUnreachable(f"no QMP socket at {self.path}: {e.strerror}",
                                 hint="is the VM running?") from e
        try:
            sock.settimeout(self.timeout)
            sock.connect(f"/proc/self/fd/{dirfd}/{self.path.name}")
        except OSError as e:
            sock.close()
            raise QMPUnreachable(f"cannot connect to QMP at {self.path}: {e}",
                                 hint="is the VM running?", retryable=True) from e
        finally:
            os.close(dirfd)
        self._sock = sock
        try:
            greeting = self._read(deadline)
            if "QMP" not in greeting:
                raise QMPUnreachable(f"{self.path} is not a QMP socket: {greeting!r:.200}")
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def __enter__(self) -> QMP:
        return self.connect() if self._sock is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- protocol --------------------------------------------------------------------------
    def _read(self, deadline: float) -> dict[str, Any]:
        """One JSON object (QMP puts each on its own line)."""
        assert self._sock is not None
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPUnreachable(f"QMP at {self.path} did not answer in "
                                     f"{self.timeout:.0f} s", hint="QEMU may be busy or "
                                     "another client holds the monitor; retry", retryable=True)
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                raise QMPUnreachable(f"QMP at {self.path}: {e}", retryable=True) from e
            if not chunk:
                raise QMPUnreachable(f"QMP at {self.path} closed the connection",
                                     hint="QEMU may have exited", retryable=True)
            self._buf += chunk
            if len(self._buf) > _MAX_LINE:
                raise QMPUnreachable(f"QMP at {self.path} sent a line over {_MAX_LINE} bytes")
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError as e:
            raise QMPUnreachable(f"QMP at {self.path} sent no JSON: {line[:200]!r}") from e
        if not isinstance(msg, dict):
            raise QMPUnreachable(f"QMP at {self.path} sent {msg!r:.200}")
        return msg

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command; its ``return`` value, or :class:`QMPError` with QEMU's words."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        self._next_id += 1
        ident = f"corral-{self._next_id}"
        req: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            req["arguments"] = arguments
        deadline = time.monotonic() + self.timeout
        try:
            self._sock.sendall(json.dumps(req).encode() + b"\n")
        except OSError as e:
            raise QMPUnreachable(f"QMP at {self.path}: {e}", retryable=True) from e
        while True:
            msg = self._read(deadline)
            if "event" in msg:
                self.events.append(msg)
                continue
            if msg.get("id") != ident:
                continue
            if "error" in msg:
                err = msg["error"] if isinstance(msg["error"], dict) else {}
                raise QMPError(f"QMP {command} failed: {err.get('desc', msg['error'])}",
                               hint="see QEMU's stderr.log in the instance's directory",
                               details={"class": err.get("class"), "command": command})
            return msg.get("return")


def execute(sock_path: Path, command: str, arguments: dict[str, Any] | None = None,
            timeout: float = 5.0) -> Any:
    """One command on a connection of its own."""
    with QMP(sock_path, timeout) as q:
        return q.execute(command, arguments)
