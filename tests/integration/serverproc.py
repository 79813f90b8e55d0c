"""``corral server`` as a process of its own, for the tests that kill one with -9.

A subclass says how its server is configured (:meth:`ServerProc.env`); starting, waiting for
``server.json`` (written once the API listens), killing and stopping are the same for all.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


class ServerProc:
    def __init__(self, data: Path) -> None:
        self.data = data
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] | None = None

    def env(self) -> dict[str, str]:
        """The ``CORRAL_*`` settings of this server (the caller's own are dropped)."""
        raise NotImplementedError

    def start(self) -> None:
        """Start it without waiting: several servers of a cluster start together."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        env |= self.env()
        self.data.mkdir(exist_ok=True)
        (self.data / "server.json").unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "corral.control"], env=env,
                                     stdout=subprocess.DEVNULL,
                                     stderr=(self.data / "server.err").open("ab"))

    def wait_ready(self, timeout: float = 90) -> dict[str, Any]:
        path = self.data / "server.json"
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None and self.proc.poll() is None, (
                (self.data / "server.err").read_text()[-3000:])
            with contextlib.suppress(FileNotFoundError, ValueError):
                self.info = json.loads(path.read_text())
                return self.info
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    @property
    def api(self) -> str:
        assert self.info is not None
        return str(self.info["api_url"])

    @property
    def nats(self) -> str:
        assert self.info is not None
        return str(self.info["nats_url"])

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
