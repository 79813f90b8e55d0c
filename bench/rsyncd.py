"""The baselines' transport: an rsync daemon on loopback TCP, the way rsync's docs set up a
receiver without ssh (ssh is not set up here). corral's own passes are rsync too, over its data
channel (TLS on loopback TCP), so both sides cross the same kind of link; the daemon's side has
no encryption at all, which if anything favours the baseline.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

#: what the rsync docs advise for a mirror that must be exact: hard links, ACLs, xattrs,
#: owners by number, deletions; ``--inplace`` as a cron job that avoids a second copy would
CRON_FLAGS = ["-aHAX", "--delete", "--numeric-ids", "--inplace", "--stats"]


class RsyncDaemon:
    """``rsync --daemon`` in the foreground on 127.0.0.1, serving ``modules`` (name -> dir)
    writable, as root (so owners are kept); stopped by its pid on exit."""

    def __init__(self, work: Path, modules: dict[str, Path]) -> None:
        self.work, self.modules = work, modules
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RsyncDaemon:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        conf = self.work / "rsyncd.conf"
        lines = ["uid = 0", "gid = 0", "use chroot = no", "munge symlinks = no",
                 "read only = no", "list = yes", f"log file = {self.work / 'rsyncd.log'}"]
        for name, path in self.modules.items():
            lines += [f"[{name}]", f"path = {path}"]
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            ["rsync", "--daemon", "--no-detach", f"--config={conf}", "--address=127.0.0.1",
             f"--port={self.port}"], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.__exit__(None, None, None)
                    raise SystemExit("the rsync daemon did not start: see "
                                     f"{self.work / 'rsyncd.log'}") from None
                time.sleep(0.05)

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def url(self, module: str, sub: str = "", port: int | None = None) -> str:
        return f"rsync://127.0.0.1:{port or self.port}/{module}/{sub}"


def run_rsync(args: list[str]) -> tuple[float, int, int]:
    """One rsync run: (seconds, bytes sent, bytes received), from its ``--stats``."""
    t0 = time.monotonic()
    proc = subprocess.run(["rsync", *args], capture_output=True, text=True)
    took = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"rsync {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    sent = re.search(r"Total bytes sent: ([\d,.]+)", proc.stdout)
    got = re.search(r"Total bytes received: ([\d,.]+)", proc.stdout)

    def num(m: re.Match[str] | None) -> int:
        return int(re.sub(r"[,.]", "", m.group(1))) if m else 0

    return took, num(sent), num(got)
