"""A real web server as a workload: nginx from the Debian package, with real clients, through a
crash under a restart policy, a health check, a host drain and a stop.

nginx is the classic daemon: a master that drops its workers to ``www-data``, a pid file, a
listening socket the workers share. Its failure modes are what an orchestrator gets wrong: a
master killed with -9 leaves its workers serving on the port, so a restart that does not end
them fails with "Address already in use" for ever (and two generations would serve at once).
The clients are plain HTTP clients counting answers; the access log is tailed by corral.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleetkit import Fleet, fleet_for

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="nginx drops its workers to www-data: root"),
    pytest.mark.skipif(not Path(NGINX).exists(),
                       reason="needs the nginx package (scripts/bootstrap installs it)"),
    pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync (drain moves disks)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nginx_script(port: int) -> str:
    """The instance, in its own disk: a config and a page on first start, then nginx's master
    in the foreground (``exec``: corral's SIGTERM is nginx's fast shutdown)."""
    return f"""
mkdir -p html logs tmp && chmod 755 . html && chown www-data logs tmp || exit 1
[ -s html/index.html ] || echo "served by corral's nginx" > html/index.html
cat > nginx.conf <<EOF
daemon off;
master_process on;
worker_processes 2;
user www-data;
pid $PWD/nginx.pid;
error_log stderr notice;
events {{ worker_connections 64; }}
http {{
  access_log $PWD/logs/access.log combined;
  client_body_temp_path $PWD/tmp/body;
  proxy_temp_path $PWD/tmp/proxy;
  fastcgi_temp_path $PWD/tmp/fastcgi;
  uwsgi_temp_path $PWD/tmp/uwsgi;
  scgi_temp_path $PWD/tmp/scgi;
  server {{
    listen 127.0.0.1:{port};
    root $PWD/html;
    location = /healthz {{ access_log off; return 200 "ok\\n"; }}
  }}
}}
EOF
exec {NGINX} -c "$PWD/nginx.conf" -p "$PWD"
"""


class Clients(threading.Thread):
    """Two clients' worth of GETs in turn, each counted as answered (200 with the page) or
    not; bounded in requests and time."""

    def __init__(self, port: int, limit: int = 100_000, seconds: float = 400) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/"
        self.limit, self.seconds = limit, seconds
        self.ok = 0
        self.failed = 0
        self.bad: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.seconds
        for _ in range(self.limit):
            if self.halt.is_set() or time.monotonic() > deadline:
                return
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    body = r.read()
                if r.status == 200 and body == b"served by corral's nginx\n":
                    self.ok += 1
                else:
                    self.bad.append(f"{r.status} {body[:80]!r}")
            except (OSError, urllib.error.URLError):
                self.failed += 1
                time.sleep(0.05)
            time.sleep(0.01)

    def wait_answers(self, more: int, timeout: float = 60) -> None:
        want = self.ok + more
        deadline = time.monotonic() + timeout
        while self.ok < want:
            assert time.monotonic() < deadline, f"nginx stopped answering ({self.ok} answered)"
            time.sleep(0.05)


def _conf(pid: int | str) -> str | None:
    """The config an nginx process runs with, read from its title ("nginx: master process
    /usr/sbin/nginx -c CONF ...": nginx rewrites its argv into one string); a worker's title
    names none, so its master's is read."""
    words = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").split()
    return words[words.index(b"-c") + 1].decode() if b"-c" in words else None


def nginx_procs(disk_root: Path) -> list[tuple[int, int, str]]:
    """(pid, ppid, host) of every nginx process (zombies too) whose config is in a host's disk
    under ``disk_root``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (d / "stat").read_text()
            if not stat.split("(", 1)[1].startswith("nginx)"):
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            conf = _conf(d.name) or _conf(ppid)
            if conf is not None and conf.startswith(str(disk_root)):
                out.append((int(d.name), ppid, Path(conf).relative_to(disk_root).parts[0]))
    return out


def master_pid(disk_root: Path) -> int:
    masters = [pid for pid, ppid, _ in nginx_procs(disk_root)
               if ppid not in {p for p, _, _ in nginx_procs(disk_root)}]
    assert len(masters) == 1, f"want one nginx master, found {nginx_procs(disk_root)}"
    return masters[0]


def wait_health(f: Fleet, name: str, want: str, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while (v := f.instance(name))["health"] != want:
        assert time.monotonic() < deadline, f"{name}'s health is {v['health']}, not {want}"
        time.sleep(0.3)
    return v


@pytest.fixture(scope="module")
def disk_root() -> Iterator[Path]:
    """Disks www-data can reach the pages in (pytest's temp dirs are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="corral-nginx-", dir="/var/tmp"))
    root.chmod(0o711)
    yield root
    for pid, _, _ in nginx_procs(root):  # whatever a failed test left
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, disk_root: Path) -> Iterator[Fleet]:
    with fleet_for(tmp_path_factory.mktemp("nginxfleet"), "--hosts", "2",
                   "--disk-root", str(disk_root)) as f:
        yield f


def test_nginx_through_a_crash_a_check_a_drain_and_a_stop(fleet: Fleet, disk_root: Path) -> None:
    f = fleet
    port = free_port()
    f.ok("run", "web", "--host", "host1", "--cpus", "0.2", "--memory", "128M",
         "--restart", "on-failure", "--restart-delay", "0.5",
         "--check", f"http://:{port}/healthz", "--check-interval", "1s",
         "--check-threshold", "2", "--tail", "access=logs/access.log",
         "--", "sh", "-c", nginx_script(port))
    clients = Clients(port)
    clients.start()
    try:
        wait_health(f, "web", "healthy")
        clients.wait_answers(20)
        assert {h for _, _, h in nginx_procs(disk_root)} == {"host1"}

        # the master killed with -9: its workers must go with it, or the new master cannot
        # bind the port (and would never be healthy again)
        old = {pid for pid, _, _ in nginx_procs(disk_root)}
        os.kill(master_pid(disk_root), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while (v := f.instance("web"))["restarts"] < 1 or v["state"] != "running":
            assert time.monotonic() < deadline, f"not restarted: {v}\n{f.logs(30)}"
            time.sleep(0.3)
        wait_health(f, "web", "healthy")
        clients.wait_answers(20)
        now = {pid for pid, _, _ in nginx_procs(disk_root)}
        assert not now & old, f"a process of the killed copy still runs: {now & old}"
        assert len(now) == 3, f"one master and two workers, found {nginx_procs(disk_root)}"

        # the access log is captured: the clients' requests are in it
        out = f.ok("logs", "web", "--source", "access")
        assert "GET / HTTP/1.1\" 200" in out, out[-2000:]

        # drain host1: nginx moves to host2 with its disk and keeps serving the same page
        f.ok("host", "drain", "host1", timeout=300)
        v = f.instance("web")
        assert v["host"] == "host2" and v["state"] == "running", v
        wait_health(f, "web", "healthy")
        clients.wait_answers(20)
        assert {h for _, _, h in nginx_procs(disk_root)} == {"host2"}
        f.ok("host", "undrain", "host1")

        # a stop ends every process of it: master and workers
        f.ok("stop", "web", timeout=60)
        assert nginx_procs(disk_root) == []
    finally:
        clients.halt.set()
        clients.join(timeout=10)
        with contextlib.suppress(Exception):
            f.cli("rm", "--force", "web")
    assert not clients.bad, clients.bad[:5]
