"""Live migration of a qemu VM: QEMU's own ``migrate``, with TLS from the fleet's CA.

**Memory and disk in one stream (block migration).** The destination QEMU is started with the
same machine, devices and disk path (``-incoming defer``, then ``migrate-incoming``); the source
runs ``migrate`` with the ``block`` capability, so QEMU copies the disk's blocks and the guest's
RAM through the same connection, tracks what the guest dirties in both, and switches over when
what is left fits ``downtime-limit``. Why not ``drive-mirror`` to an NBD export: in QEMU 7.2
neither ``drive-mirror`` nor ``blockdev-mirror`` takes a dirty bitmap, so a mirror with
``sync: full`` sends every allocated block again whatever corral's file pass already copied,
and it needs a second listener (the NBD server, with its own TLS) plus the ordering of the
mirror's completion against the memory switch-over (``pause-before-switchover``). Block
migration converges disk and memory in one dirty-tracking loop over one authenticated socket,
and its failure leaves nothing half-switched. The disk crosses once: corral's file pass puts the
rest of the disk directory (kernel, initrd, ``vm.json``) in the destination's slot and only the
*size* of ``disk.raw``, which the destination makes as a sparse file before QEMU opens it
(``rpc.SendArgs.shape_only``; a qcow2, whose empty file would not be one, and a btrfs pass,
which cannot leave a file out, still send it). Its drawback: QEMU 8.2 deprecated block migration
(9.1 removed it): on a newer QEMU this module is where the mirror goes.

**Encrypted and authenticated.** Both ends get ``tls-creds-x509`` objects made from the host's
own certificate and key (signed by the fleet's CA at enrolment) and the CA; the source checks
the destination's certificate names the target host (``tls-hostname``), the destination
accepts only a client whose certificate's DN is the source host's (``tls-authz`` with an
``authz-simple`` identity ``CN=<source>``). The port is open only for the one migration: QEMU
listens on it after ``migrate-incoming`` and closes it when the stream ends. Without a fleet CA
(``tls = off``, loopback fleets only) the stream is plain TCP.

**Connections.** With user-mode networking the host end of a ``hostfwd`` connection is a socket
of the source QEMU process in the source host's network namespace; slirp migrates its own
tables but that socket cannot follow, so such connections break at switch-over (the forward
itself is listening again on the destination at once). Memory, CPU state, the guest's own
TCP stack and its uptime continue.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Literal

from corral.drivers.base import MigrationStats
from corral.drivers.base import MigrationTls as TlsFiles
from corral.errors import DriverError

__all__ = ["MigrationStats", "TlsFiles"]

TLS_DIR = "migrate-tls"
CREDS_ID = "corral-migrate-tls"
AUTHZ_ID = "corral-migrate-authz"
#: QEMU's own default downtime limit
DEFAULT_DOWNTIME_MS = 300
#: bytes per second; QEMU 7.2's default (32 MiB/s) would make a 512 MiB guest take 16 s
MAX_BANDWIDTH = 1 << 30
#: RFC 7919's ffdhe2048 group (PKCS#3). Without a ``dh-params.pem`` a server-side
#: ``tls-creds-x509`` makes fresh DH parameters when it is created, seconds of CPU (more than
#: QMP's timeout on a busy host); a standard group is as strong and costs nothing.
DH_PARAMS = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""
#: how long QEMU may take to load credentials or start listening
SETUP_TIMEOUT = 60.0
#: query-migrate statuses after which nothing more happens
ENDED = frozenset({"completed", "failed", "cancelled"})
#: how often the source is asked how far it got
POLL_EVERY = 0.1
#: how long a ``completed`` without its figures is asked again (see :func:`settled`)
SETTLE_TIMEOUT = 5.0


def settled(info: dict[str, Any], since: float, now: float) -> bool:
    """Whether a ``completed`` answer carries its figures. QEMU's migration thread sets the
    state to completed a moment before it computes ``total-time`` and ``downtime``; an answer
    in between reads 0 for both (a switch-over with no pause, which it was not). Asked again
    until they are there, for at most :data:`SETTLE_TIMEOUT` after the first such answer."""
    return bool(info.get("total-time")) or now - since > SETTLE_TIMEOUT


def parse_stats(info: dict[str, Any], completed: bool = False) -> MigrationStats:
    """``disk`` is the last block-migration figure seen while it ran (``query-migrate``
    leaves it out once the disk is done); a completed migration sent every block at least
    once, so its total is a floor."""
    ram = info.get("ram") or {}
    disk = info.get("disk") or {}
    down = info.get("downtime")
    setup = info.get("setup-time")
    return MigrationStats(
        status=str(info.get("status") or "none"),
        total_ms=float(info.get("total-time") or 0),
        downtime_ms=None if down is None else float(down),
        setup_ms=None if setup is None else float(setup),
        ram_bytes=int(ram.get("transferred") or 0),
        disk_bytes=max(int(disk.get("transferred") or 0),
                       int(disk.get("total") or 0) if completed else 0),
        dirty_syncs=int(ram.get("dirty-sync-count") or 0))


def write_tls_dir(workdir: Path, tls: TlsFiles, endpoint: Literal["server", "client"]) -> Path:
    """The directory QEMU's ``tls-creds-x509`` reads (its fixed file names), private to root:
    it holds a copy of the host's key for as long as the migration lasts."""
    d = workdir / TLS_DIR
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(mode=0o700)
    for src, name in ((tls.ca_file, "ca-cert.pem"), (tls.cert_file, f"{endpoint}-cert.pem"),
                      (tls.key_file, f"{endpoint}-key.pem")):
        try:
            data = Path(src).read_bytes()
        except OSError as e:
            raise DriverError(f"cannot read {src} for the migration's TLS: {e.strerror}",
                              hint="the host's enrolment files are missing; enrol it again") from e
        _write(d / name, data)
    if endpoint == "server":
        _write(d / "dh-params.pem", DH_PARAMS.encode())
    return d


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def remove_tls_dir(workdir: Path) -> None:
    shutil.rmtree(workdir / TLS_DIR, ignore_errors=True)


def free_port(address: str) -> int:
    """A port free on ``address`` now (the kernel's pick); QEMU binds it a moment later, and a
    lost race is retried by the caller."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def uri(address: str, port: int) -> str:
    return f"tcp:[{address}]:{port}" if ":" in address else f"tcp:{address}:{port}"


def creds_args(tls_dir: Path, endpoint: Literal["server", "client"]) -> dict[str, Any]:
    return {"qom-type": "tls-creds-x509", "id": CREDS_ID, "dir": str(tls_dir),
            "endpoint": endpoint, "verify-peer": True}


def authz_args(peer: str) -> dict[str, Any]:
    """Only the source host's certificate (its CN is the host name: control/pki.py) may feed
    the destination; any other host of the fleet holds a valid certificate too."""
    return {"qom-type": "authz-simple", "id": AUTHZ_ID, "identity": f"CN={peer}"}


def capabilities() -> dict[str, Any]:
    return {"capabilities": [{"capability": "block", "state": True},
                             {"capability": "events", "state": True}]}


def send_params(downtime_ms: int, tls_hostname: str | None) -> dict[str, Any]:
    """The source's ``migrate-set-parameters``: every one set each time (a QEMU that migrated
    before keeps what the last migration set). ``downtime-limit`` is the pause the switch-over
    may take (setting ``live_migrate_downtime_ms``); a lower one makes a busy guest take more
    rounds, or never converge, a higher one ends sooner with a longer pause."""
    if not 1 <= int(downtime_ms) <= 60_000:
        raise DriverError(f"downtime limit {downtime_ms} ms is out of range",
                          hint="set live_migrate_downtime_ms between 1 and 60000")
    params: dict[str, Any] = {"downtime-limit": int(downtime_ms),
                              "max-bandwidth": MAX_BANDWIDTH, "tls-creds": ""}
    if tls_hostname is not None:
        params.update({"tls-creds": CREDS_ID, "tls-hostname": tls_hostname})
    return params


def set_send_params(execute: Any, downtime_ms: int, tls_hostname: str | None) -> None:
    """Capabilities, then parameters, on the source's QMP (``execute(command, arguments)``)."""
    execute("migrate-set-capabilities", capabilities())
    execute("migrate-set-parameters", send_params(downtime_ms, tls_hostname))


def failure(info: dict[str, Any]) -> str:
    return str(info.get("error-desc") or info.get("status") or "unknown")


def cleanup_objects(execute: Any) -> None:
    """Remove the TLS objects so a later migration of the same QEMU can make them again."""
    for oid in (CREDS_ID, AUTHZ_ID):
        with contextlib.suppress(DriverError):
            execute("object-del", {"id": oid})
